"""compare() takes a FitConfig: config, cache key and extraction are separate steps; the dashboard's typed request."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import loaded, tiny_net
from kcore.fit import PRESETS, make_config
from kcore.pipeline import compare, comparison_config, extract_pair, feature_cache_key, preprocessing_desc, write_run
from kcore.preprocessing import preprocessing_of


@pytest.fixture(scope="module")
def pair():
    return loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")


def test_a_config_fits_exactly_like_the_same_settings_given_as_keywords(pair, random_images, tmp_path):
    a, b = pair
    by_config = compare(a, "2", b, "2", random_images(), make_config("fast", orders=1, epochs=2, seed=3),
                        preset="fast", device="cpu")
    by_keywords = compare(a, "2", b, "2", random_images(), orders=1, epochs=2, seed=3, device="cpu")
    fa, fb = by_config.directions["A_to_B"].fit, by_keywords.directions["A_to_B"].fit
    assert fa.config == fb.config == make_config("fast", orders=1, epochs=2, seed=3)
    assert fa.heldout_indices == fb.heldout_indices
    for (name, wa), (_, wb) in zip(fa.model.state_dict().items(), fb.model.state_dict().items()):
        torch.testing.assert_close(wa, wb, rtol=0, atol=0, msg=name)
    assert fa.heldout_report.instability == fb.heldout_report.instability
    # what the run folder records is the same too (the creation time aside)
    for c in (by_config, by_keywords):
        assert c.provenance["preset"] == "fast" and c.provenance["seed"] == 3
        assert c.provenance["config"] == dataclasses.asdict(fa.config)
    da, db = write_run(by_config, tmp_path / "c"), write_run(by_keywords, tmp_path / "k")
    for name in ("config.json", "metrics.json", "images.json"):
        ja, jb = (da / name).read_text(), (db / name).read_text()
        if name == "metrics.json":  # fit seconds differ
            import json

            ja, jb = json.loads(ja), json.loads(jb)
            for m in (ja, jb):
                m.pop("fit_seconds", None)
                for block in m["directions"].values():
                    block.pop("fit_seconds")
        assert ja == jb, name


def test_the_config_names_its_preset_in_provenance():
    assert comparison_config(PRESETS["authors"]) == (PRESETS["authors"], "authors")
    custom = make_config("fast", orders=1)
    assert comparison_config(custom) == (custom, None)  # equals no preset: no name is made up
    assert comparison_config(custom, "fast") == (custom, "fast")
    assert comparison_config(None, "authors", epochs=3) == (make_config("authors", epochs=3), "authors")
    assert comparison_config() == (PRESETS["fast"], "fast")


def test_config_errors_name_the_argument_and_the_fix(pair, random_images):
    a, b = pair
    with pytest.raises(TypeError, match=r"got config and also the fit option\(s\) \['epochs', 'orders'\]\. Fix: put"):
        compare(a, "2", b, "2", random_images(), make_config("fast"), orders=1, epochs=2)
    with pytest.raises(TypeError, match=r"config must be a kcore.FitConfig; got dict\. Fix: build it with"):
        compare(a, "2", b, "2", random_images(), {"orders": 1})
    with pytest.raises(ValueError, match=r"preset must be one of \['authors', 'fast'\].*got 'quick'"):
        comparison_config(make_config("fast"), "quick")
    with pytest.raises(ValueError, match=r"unknown fit option\(s\) \['order'\]"):
        comparison_config(None, "fast", order=1)


def test_the_cache_key_changes_with_each_input_and_extraction_is_its_own_step(pair, random_images):
    a, b = pair
    imgs = random_images(n=12, size=8)
    ids = list(imgs.ids)
    preps = (preprocessing_of(a), preprocessing_of(b))
    desc = preprocessing_desc(preps)
    key = feature_cache_key(a, b, imgs, ids, desc)
    assert key == feature_cache_key(a, b, imgs, ids, desc)
    assert key != feature_cache_key(b, a, imgs, ids, desc)  # the checkpoints' bytes
    assert key != feature_cache_key(a, b, random_images(n=12, size=9), ids, desc)  # the images' content
    other = preps[0].with_overrides(input_size=(12, 12))
    assert key != feature_cache_key(a, b, imgs, ids, preprocessing_desc((other, preps[1])))  # the preprocessing
    feats, (xa, xb) = extract_pair(a, "2", b, "2", imgs, ids=ids, preps=preps, device=torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(xa, tiny_net(0)[:3](imgs.x))
        torch.testing.assert_close(xb, tiny_net(1, width=5)[:3](imgs.x))
    assert tuple(feats.image_ids) == tuple(ids)


# -- the dashboard's typed request ----------------------------------------------------------------------------

def test_the_fit_request_becomes_the_config_the_cli_would_build():
    pytest.importorskip("streamlit")
    from dashboard.state.jobs import FitRequest

    req = FitRequest(orders=1, lam=0.3, epochs=5, seed=7, preset="authors")
    assert req.config() == make_config("authors", orders=1, lam=0.3, epochs=5, seed=7)
    assert FitRequest().config() == make_config("fast", orders=2, lam=0.1, seed=0)
    assert FitRequest.from_params(req.as_params()) == req
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['fit_options'\]; expected only \['orders'"):
        FitRequest.from_params({**req.as_params(), "fit_options": {"budget": 1}})


def test_start_fit_checks_a_typed_request_on_the_server():
    pytest.importorskip("streamlit")
    from dashboard.state._images import ImageChoice
    from dashboard.state.jobs import FitRequest, start_fit
    from kcore.limits import LimitExceeded

    big = ImageChoice(images=range(5000), description="5000 images", kind="upload")
    with pytest.raises(LimitExceeded, match="KCORE_MAX_FIT_WORK"):
        start_fit(None, "x", None, "y", big, FitRequest(preset="authors", both_directions=True, baselines=True))
    with pytest.raises(TypeError, match=r"fit setting 'orders' must be an integer; got 2.5"):
        start_fit(None, "x", None, "y", big, FitRequest(orders=2.5))
