"""Training: the shared engine (`engine.py`), optimizer groups and schedules (`optim.py`), fine-tuning
(`supervised.py`) and DINOv2 pretraining (`dino_v2.py`). Import the submodules directly."""
