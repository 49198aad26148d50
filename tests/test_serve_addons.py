"""What the service adds to the model's answer, through FastAPI's test client: the location prior (request values,
else EXIF), the user's own species, "unknown", similar photos and their thumbnails, and the start-up checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hierax.errors import HieraxError
from hierax.geo import apply_prior
from hierax.inference.classification import infer_image
from hierax.serve import create_app
from hierax.serve.options import Addons
from hierax.similar import ModelIdentity, ModelMismatchError, build_index, combine_scores, embed_images, open_index
from hierax.similar.fewshot import fit_prototypes
from hierax.transforms import classification_transform
from tests.serve_support import (
    NORTH,
    SOUTH,
    SUMMER,
    chelsea_jpeg,
    gps_jpeg,
    hemisphere_prior,
    tiny_model,
    write_photos,
)

JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture(scope="module")
def model():
    return tiny_model(size=32)


@pytest.fixture(scope="module")
def prior():
    return hemisphere_prior()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    groups = write_photos(root / "photos", count=3)
    (root / "photos" / "gps.jpg").write_bytes(gps_jpeg(46.5, 8.0))
    return root, groups


@pytest.fixture(scope="module")
def index(model, photos):
    root, groups = photos
    paths = [p for group in groups.values() for p in group] + [str(root / "photos" / "gps.jpg")]
    build_index(paths, model, output=root / "index", progress=False, workers=0)
    return open_index(root / "index")


@pytest.fixture(scope="module")
def species(model, photos):
    """The user's species: 'my chelsea' and 'my coffee', from four variants each (the fifth is kept back)."""
    net, info = model
    _, groups = photos
    refs = groups["chelsea"][:4] + groups["coffee"][:4]
    _, vectors, _ = embed_images(refs, net, info, workers=0)
    identity = ModelIdentity.of((net, info), net, info)
    return fit_prototypes(vectors, [0] * 4 + [1] * 4, ["my chelsea", "my coffee"], identity)


def _image_probs(model, data: bytes) -> np.ndarray:
    net, info = model
    probs, emb = infer_image(net, data, classification_transform(info.size, info.rgb_stats), return_embedding=True)
    return probs, emb


def _classify(client, data: bytes, query: str = "", **form):
    if form:
        files = {"file": ("photo.jpg", data, "image/jpeg")}
        response = client.post(f"/v1/classify?top_k=8{query}", files=files, data=form)
    else:
        response = client.post(f"/v1/classify?top_k=8{query}", content=data, headers=JPEG)
    assert response.status_code == 200, response.text
    return response.json()


def _top(body) -> int:
    return body["predictions"][0]["index"]


def test_the_prior_follows_the_place_given_by_the_request(model, prior):
    net, info = model
    chelsea = chelsea_jpeg()
    with TestClient(create_app(net, info, addons=Addons(geo_prior=prior))) as client:
        north = _classify(client, chelsea, "&lat=45&lon=7&date=2023-01-10")
        south = _classify(client, chelsea, lat="-33.9", lon="151.2", date="2023-01-10")
        undated = _classify(client, chelsea, lat="-33.9", lon="151.2")
        form_wins = _classify(client, chelsea, "&lat=45&lon=7&date=2023-01-10", lat="-45", lon="7")
        assert client.get("/v1/models").json()["features"]["geo_prior"] is True
    assert north["geo"] == {
        "applied": True,
        "latitude": 45.0,
        "longitude": 7.0,
        "date": "2023-01-10",
        "location_source": "request",
        "date_source": "request",
        "warnings": [],
    }
    assert _top(north) == NORTH and _top(south) == SOUTH and _top(form_wins) == SOUTH
    assert undated["geo"]["date"] is None and undated["geo"]["applied"] is True
    # an undated photo is weighed by each species' best month: the summer species counts as present too
    assert {p["index"] for p in undated["predictions"][:2]} == {SOUTH, SUMMER}
    image, _ = _image_probs(model, chelsea)
    expected, applied = apply_prior(prior, image, [45.0], [7.0], ["2023-01-10"])
    assert applied.tolist() == [True]
    got = {p["index"]: p["probability"] for p in north["predictions"]}
    np.testing.assert_allclose([got[i] for i in range(8)], expected[0], rtol=1e-5, atol=1e-6)
    assert north["verdict"]["probability"] >= north["predictions"][0]["probability"]  # rolled up after the prior


def test_without_request_values_the_prior_reads_the_photos_exif(model, prior):
    net, info = model
    photo = gps_jpeg(-33.87, 151.21, "2023:01:10 06:15:00")
    with TestClient(create_app(net, info, addons=Addons(geo_prior=prior))) as client:
        exif = _classify(client, photo)
        overridden = _classify(client, photo, "&lat=45&lon=7")
        plain = _classify(client, chelsea_jpeg())
    assert exif["geo"]["location_source"] == "exif" and exif["geo"]["date_source"] == "exif"
    assert exif["geo"]["latitude"] == pytest.approx(-33.87, abs=1e-3) and exif["geo"]["date"] == "2023-01-10"
    assert _top(exif) == SOUTH
    assert overridden["geo"]["location_source"] == "request" and overridden["geo"]["date_source"] == "exif"
    assert _top(overridden) == NORTH
    assert plain["geo"]["applied"] is False and plain["geo"]["latitude"] is None
    image, _ = _image_probs(model, chelsea_jpeg())
    got = {p["index"]: p["probability"] for p in plain["predictions"]}
    np.testing.assert_allclose([got[i] for i in range(8)], image[0], rtol=1e-5, atol=1e-6)  # image only


def test_bad_places_are_refused_and_no_prior_means_no_geo(model, prior):
    net, info = model
    chelsea = chelsea_jpeg()
    with TestClient(create_app(net, info, addons=Addons(geo_prior=prior))) as client:
        for query, form in (
            ("&lat=45", {}),
            ("&lat=95&lon=0", {}),
            ("", {"lat": "north", "lon": "7"}),
            ("", {"lat": "10", "lon": "190"}),
            ("&lat=1&lon=1&date=yesterday", {}),
            ("", {"date": "2023-13-45"}),
        ):
            files = {"file": ("c.jpg", chelsea, "image/jpeg")}
            response = client.post(f"/v1/classify?top_k=1{query}", files=files, data=form)
            assert response.status_code == 422 and response.json()["error"] == "invalid_request", (query, form)
    with TestClient(create_app(net, info)) as client:
        body = _classify(client, chelsea, "&lat=45&lon=7")
        assert body["geo"] is None and body["decision"] is None
        assert client.get("/v1/models").json()["features"]["geo_prior"] is False


def test_the_users_species_share_one_ranked_list(model, photos, species):
    net, info = model
    _, groups = photos
    with open(groups["chelsea"][4], "rb") as fh:
        held_back = fh.read()
    with TestClient(create_app(net, info, addons=Addons(extra_species=species))) as client:
        body = _classify(client, held_back, "&top_k=10")
        features = client.get("/v1/models").json()["features"]
    assert features["extra_species"] == ["my chelsea", "my coffee"]
    assert features["unknown_threshold"] == pytest.approx(species.unknown_threshold)
    probs, emb = _image_probs(model, held_back)
    ranked = combine_scores(probs, emb, species, info.class_names)
    got = {p["index"]: p for p in body["predictions"]}
    assert len(got) == 10 and sorted(got) == list(range(10))
    np.testing.assert_allclose([got[i]["probability"] for i in range(10)], ranked.probs[0], rtol=1e-5, atol=1e-6)
    assert [got[i]["extra"] for i in (8, 9)] == [True, True] and not any(got[i]["extra"] for i in range(8))
    assert (got[8]["label"], got[9]["scientific_name"]) == ("my chelsea", "my coffee")
    best = max(got.values(), key=lambda p: p["probability"])
    decision = body["decision"]
    assert decision["threshold"] == pytest.approx(species.unknown_threshold)
    assert decision["unknown"] == (best["probability"] < species.unknown_threshold)
    assert decision["name"] == ("unknown" if decision["unknown"] else best["scientific_name"])
    assert decision["probability"] == pytest.approx(best["probability"])


def test_only_extra_and_the_unknown_threshold(model, photos, species):
    net, info = model
    _, groups = photos
    with open(groups["coffee"][4], "rb") as fh:
        photo = fh.read()
    with TestClient(create_app(net, info, addons=Addons(extra_species=species, only_extra=True))) as client:
        alone = _classify(client, photo)
    assert [p["label"] for p in alone["predictions"]] == sorted(
        ["my chelsea", "my coffee"],
        key=lambda n: -next(p["probability"] for p in alone["predictions"] if p["label"] == n),
    )
    assert all(p["extra"] for p in alone["predictions"]) and alone["verdict"] is None
    assert sum(p["probability"] for p in alone["predictions"]) <= 1.0 + 1e-6  # the rest is "none of them"
    strict = Addons(extra_species=species, unknown_threshold=1.0)
    with TestClient(create_app(net, info, addons=strict)) as client:
        body = _classify(client, photo)
    assert body["decision"]["unknown"] is True and body["decision"]["name"] == "unknown"
    assert body["verdict"]["name"] == "unknown" and body["verdict"]["rank"] is None
    with TestClient(create_app(net, info, addons=Addons(unknown_threshold=0.0))) as client:
        lenient = _classify(client, photo)
    assert lenient["decision"]["unknown"] is False
    # with a threshold in force a roll-up that reaches no rank says so as "unknown" too (open_set_rollup)
    assert (lenient["verdict"]["name"] == "unknown") == (lenient["verdict"]["rank"] is None)
    assert lenient["decision"]["name"] == lenient["predictions"][0]["scientific_name"]
    with TestClient(create_app(net, info, addons=Addons(unknown_threshold=0.9))) as client:
        model_only = _classify(client, photo)  # a random 8-class model is never 90% sure
    assert model_only["decision"]["unknown"] is True and model_only["verdict"]["name"] == "unknown"
    for bad, message in (
        (dict(only_extra=True), "--only-extra needs --extra-species"),
        (dict(thumbnails=True), "--thumbnails needs --index"),
        (dict(unknown_threshold=1.5), "probability in"),
    ):
        with pytest.raises(HieraxError, match=message):
            Addons(**bad)


def test_similar_photos_and_thumbnails_of_indexed_photos_only(model, photos, index):
    net, info = model
    root, groups = photos
    query = groups["coffee"][2]
    with open(query, "rb") as fh:
        data = fh.read()
    with TestClient(create_app(net, info, addons=Addons(index=index))) as client:
        body = client.post("/v1/similar?k=4", content=data, headers=JPEG).json()
        assert client.get("/v1/thumbnails/0").json()["error"] == "not_enabled"
        assert client.get("/v1/models").json()["features"]["similar_index"] == len(index) == 16
    assert body["index_size"] == 16 and [m["rank"] for m in body["matches"]] == [1, 2, 3, 4]
    first = body["matches"][0]
    assert first["path"] == query and first["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert all(index.paths[m["id"]] == m["path"] and m["thumbnail"] is None for m in body["matches"])
    sims = [m["similarity"] for m in body["matches"]]
    assert sims == sorted(sims, reverse=True)
    with TestClient(create_app(net, info)) as client:
        assert client.post("/v1/similar", content=data, headers=JPEG).json()["error"] == "not_enabled"

    with TestClient(create_app(net, info, addons=Addons(index=index, thumbnails=True))) as client:
        gps = index.paths.index(str(root / "photos" / "gps.jpg"))
        with open(index.paths[gps], "rb") as fh:
            matches = client.post("/v1/similar?k=1", content=fh.read(), headers=JPEG).json()["matches"]
        assert matches[0]["thumbnail"] == f"/v1/thumbnails/{gps}"
        thumb = client.get(matches[0]["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(thumb.content)) as image:
            assert max(image.size) == 256 and image.size[0] > image.size[1]  # chelsea is 451 x 300
            assert not image.getexif()  # re-encoded: the photo's GPS is not passed on
        assert client.get("/v1/thumbnails/16").json()["error"] == "not_found"
        for path in ("/v1/thumbnails/-1", "/v1/thumbnails/..%2F..%2Fetc%2Fpasswd", "/v1/thumbnails/x"):
            assert client.get(path).status_code in (404, 422), path


def test_an_index_or_species_of_another_model_is_refused_at_start(model, index, species):
    other_net, other_info = tiny_model(size=32, seed=1)
    for addons, what in ((Addons(index=index), "the index"), (Addons(extra_species=species), "the few-shot species")):
        with pytest.raises(ModelMismatchError, match=f"{what}.* was made by another model"):
            create_app(other_net, other_info, addons=addons, model_spec="other.safetensors")
    net, info = model
    with pytest.raises(HieraxError, match="geo prior has 5 classes"):
        create_app(net, info, addons=Addons(geo_prior=hemisphere_prior(list("abcde"))))
