"""Formats other tools read and write: MegaDetector batch files (megadetector), detection tables (rows), events
(events), Camera Trap Data Packages (camtrapdp) and XMP sidecars (xmp)."""
