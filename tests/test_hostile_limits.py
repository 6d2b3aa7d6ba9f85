"""One budget for work (issue 23, item 6): caps on pixels, images and classes that no card or upload can lift.

Every payload is built at test time: a valid 1-bit PNG of 13 300² pixels (about 21 kB), zips of tiny PNGs that a
model card asks to upsample, cards with ``extra.resize_size=3000`` and ``num_classes`` of 30 M or 1e10. Each cap is
checked through the API, and where a user reaches it, through the CLI and the dashboard; each environment variable
is shown to move its cap. Caps are lowered through the environment where the default would make a test slow.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kcore.limits as klimits
from kcore.architectures import build_model
from kcore.cards import ModelCard, card_path_for, read_card
from kcore.data import ImageSet, Preprocess, decode_image
from kcore.limits import ENV_VARS, LimitExceeded, Limits, input_tensor_bytes, limits
from kcore.preprocessing import Preprocessing, load_size

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "kshapes_tinynet_s0.safetensors"
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason="sample models not built")
UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # images in [0, 1], as the CLI and the dashboard load them


@pytest.fixture(autouse=True)
def _default_caps(monkeypatch):
    """Every test starts from the defaults, whatever the environment running the suite sets."""
    for env in ENV_VARS.values():
        monkeypatch.delenv(env, raising=False)


# ------------------------------------------------------------------------------------------------ payloads
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _one_bit_png(side: int, value: int = 0) -> bytes:
    """A valid 1-bit greyscale PNG of ``side × side`` pixels, all ``value``; compressed row by row (no big buffer)."""
    row = b"\0" + bytes([0xFF if value else 0x00]) * ((side + 7) // 8)  # filter byte "none", then the bits
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _png(size: int = 4, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _zip_of_pngs(n: int, size: int = 4) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(n):
            zf.writestr(f"img{i:05d}.png", _png(size, seed=i))
    return buf.getvalue()


def test_the_one_bit_png_is_real():
    """The bomb's construction gives a valid image: a small one decodes to the planted pixels."""
    small = decode_image(_one_bit_png(37, value=1))
    assert small.shape == (37, 37, 3) and (small == 255).all()
    assert (decode_image(_one_bit_png(20, value=0)) == 0).all()
    big = _one_bit_png(13_300)
    assert len(big) < 40_000  # about 21 kB on disk ...
    with pytest.warns(Image.DecompressionBombWarning), Image.open(io.BytesIO(big)) as im:  # ... and 176.9 M px
        assert im.size == (13_300, 13_300) and im.mode == "1"


# ------------------------------------------------------------------------------------------------ the module
def test_defaults_allow_real_work():
    """The defaults, as arithmetic: 5000 images at 224 px, 5000 twelve-megapixel photos and a 6000² photo pass."""
    cap = limits()
    assert cap == Limits()
    assert input_tensor_bytes(5000, (224, 224)) == 5000 * 3 * 224 * 224 * 4 <= cap.max_input_bytes
    assert 5000 <= cap.max_images
    assert 5000 * 4000 * 3000 <= cap.max_request_pixels
    assert 6000 * 6000 <= cap.max_image_pixels < 13_300 ** 2
    assert max(224, 256, 299, 384, 518) <= cap.max_input_side  # torchvision's crop and resize sizes
    assert 21_841 <= cap.max_classes < 30_000_000  # ImageNet-21k passes
    # what they stop: 100 000 tiny PNGs at a card's 2048 px are refused after a few hundred images at most
    per_image = input_tensor_bytes(1, (2048, 2048))
    assert cap.max_input_bytes // per_image < 200 and input_tensor_bytes(100_000, (2048, 2048)) > cap.max_input_bytes


def test_module_docstring_documents_every_cap():
    doc = klimits.__doc__
    for f in fields(Limits):
        assert f.name in doc and ENV_VARS[f.name] in doc, f.name
        assert ENV_VARS[f.name] == "KCORE_" + f.name.upper()


@pytest.mark.parametrize("name", [f.name for f in fields(Limits)])
def test_each_env_variable_sets_its_cap(name, monkeypatch):
    default = getattr(Limits(), name)
    monkeypatch.setenv(ENV_VARS[name], "1_234")
    assert getattr(limits(), name) == 1234
    monkeypatch.setenv(ENV_VARS[name], "2e3")
    assert getattr(limits(), name) == 2000
    others = {f.name: getattr(limits(), f.name) for f in fields(Limits) if f.name != name}
    assert others == {k: getattr(Limits(), k) for k in others}  # only its own cap moved
    monkeypatch.delenv(ENV_VARS[name])
    assert getattr(limits(), name) == default
    for bad in ("0", "-5", "many", "1.5", "inf"):
        monkeypatch.setenv(ENV_VARS[name], bad)
        with pytest.raises(ValueError, match=rf"{ENV_VARS[name]} must be a whole number >= 1.*got '{bad}'.*Fix:"):
            limits()


def test_limit_exceeded_says_what_the_cap_the_variable_and_the_fix():
    with pytest.raises(LimitExceeded) as info:
        Limits(max_classes=10).check("max_classes", 11, what="num_classes", fix="pass fewer classes")
    exc = info.value
    assert isinstance(exc, ValueError)
    assert (exc.cap_name, exc.env, exc.asked, exc.cap) == ("max_classes", "KCORE_MAX_CLASSES", 11, 10)
    assert str(exc).startswith("num_classes is 11; this server allows at most 10 classifier outputs")
    assert "Fix: pass fewer classes; or, for the server's operator, raise the cap with KCORE_MAX_CLASSES=<n>" in str(exc)
    Limits(max_classes=10).check("max_classes", 10, what="num_classes", fix="-")  # at the cap: allowed
    with pytest.raises(ValueError, match="Limits.max_images must be a positive integer.*KCORE_MAX_IMAGES"):
        Limits(max_images=0)


# ------------------------------------------------------------------------------------------------ pixels per image
_BOMB_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import io, resource, sys, warnings, zipfile
    warnings.simplefilter("ignore")
    from kcore.data import ImageSet, decode_image
    from kcore.limits import LimitExceeded
    bomb = sys.stdin.buffer.read()
    good = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good, "PNG")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("photos/bomb.png", bomb)
        zf.writestr("photos/good.png", good.getvalue())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decode_image(bomb)
        print("DECODED")
    except LimitExceeded as exc:
        print("REFUSED", exc)
    s = ImageSet.from_uploads([("photos.zip", zbuf.getvalue()), ("bomb.png", bomb)])
    print("IDS", list(s.ids))
    print("SKIPPED", dict(s.skipped)["bomb.png"])
    print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")


def test_one_bit_png_bomb_is_refused_from_its_header_with_bounded_memory():
    """A 21 kB 1-bit PNG of 13 300² pixels (2.5 GB once decoded to RGB floats) is refused before decoding.

    Run in a fresh process so that its peak resident memory measures this request alone."""
    bomb = _one_bit_png(13_300)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name in ENV_VARS.values():
        env.pop(name, None)
    r = subprocess.run([sys.executable, "-c", _BOMB_IN_A_FRESH_PROCESS], input=bomb, env=env,
                       capture_output=True, timeout=300)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    refused = lines["REFUSED"]
    assert "13300×13300 = 176,890,000 pixels (mode 1)" in refused
    assert "at most 40,000,000 decoded pixels" in refused and "KCORE_MAX_IMAGE_PIXELS" in refused
    assert "Fix: downscale the image" in refused
    assert lines["IDS"] == "['photos.zip/photos/good.png']"  # the rest of the request still loads
    assert lines["SKIPPED"].startswith("too large:") and "KCORE_MAX_IMAGE_PIXELS" in lines["SKIPPED"]
    # decoding it would take 177 MB as 1-bit-per-byte and 530 MB as RGB; refusing it takes next to nothing
    assert int(lines["GROWTH_KB"]) < 100_000, out


def test_image_pixel_cap_follows_its_env_variable(monkeypatch):
    data = _png(100)
    assert decode_image(data).shape == (100, 100, 3)
    monkeypatch.setenv("KCORE_MAX_IMAGE_PIXELS", "9999")
    with pytest.raises(LimitExceeded, match=r"100×100 = 10,000 pixels.*at most 9,999.*KCORE_MAX_IMAGE_PIXELS"):
        decode_image(data)
    with pytest.raises(ValueError, match=r"no readable image found.*too large.*KCORE_MAX_IMAGE_PIXELS"), \
            pytest.warns(UserWarning, match=r"skipped 1 of 1 .*photo.png \(too large:"):
        ImageSet.from_uploads([("photo.png", data)], Preprocess((16, 16), *UNIT))
    assert decode_image(data, limits=Limits(max_image_pixels=10_000)).shape == (100, 100, 3)  # an explicit budget


# ------------------------------------------------------------------------------------------------ per image set
def test_zip_of_tiny_pngs_upsampled_by_a_card_stops_at_the_input_cap(monkeypatch):
    """A card's ``resize_size`` makes the images load at 2048²: the zip stops at the model-input cap, not at TBs."""
    card = ModelCard.from_dict({"architecture": "kc_tinynet", "num_classes": 10, "input_size": [224, 224],
                                "mean": [0.5] * 3, "std": [0.5] * 3, "extra": {"resize_size": 2048}})
    size = load_size(Preprocessing.from_card(card))
    assert size == (2048, 2048)
    zipped = _zip_of_pngs(60)
    assert len(zipped) < 60 * 300  # about 220 bytes per image
    per_image = input_tensor_bytes(1, size)
    monkeypatch.setenv("KCORE_MAX_INPUT_BYTES", str(4 * per_image))  # 4 images (the default: 170)
    with pytest.raises(LimitExceeded) as info:
        ImageSet.from_zip(zipped, Preprocess(size, *UNIT, resize="center_crop"))
    msg = str(info.value)
    assert msg.startswith("zip archive (bytes): the model input of 5 images at 2048×2048 (reading stopped at "
                          "'img00004.png', after 4)")
    assert "KCORE_MAX_INPUT_BYTES" in msg and "at most 4 at 2048×2048" in msg and "Fix: use fewer images" in msg
    assert info.value.asked == 5 * per_image and info.value.cap == 4 * per_image
    # the same zip at the model's own 224 px fits
    assert len(ImageSet.from_zip(zipped, Preprocess((224, 224), *UNIT))) == 60


def test_image_count_cap_stops_decoding(monkeypatch, tmp_path):
    zipped = _zip_of_pngs(30)
    monkeypatch.setenv("KCORE_MAX_IMAGES", "20")
    with pytest.raises(LimitExceeded, match=r"^uploads: the number of images \(reading stopped at "
                                            r"'a.zip/img00020.png', after 20\) is at least 21; this server allows at "
                                            r"most 20 images in one image set \(KCORE_MAX_IMAGES\)\. Fix: use fewer"):
        ImageSet.from_uploads([("a.zip", zipped)], Preprocess((8, 8), *UNIT))
    monkeypatch.setenv("KCORE_MAX_IMAGES", "30")
    assert len(ImageSet.from_uploads([("a.zip", zipped)], Preprocess((8, 8), *UNIT))) == 30
    # a folder read with a limit below the cap gives that many images, without an error
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(_png(seed=i))
    monkeypatch.setenv("KCORE_MAX_IMAGES", "5")
    assert len(ImageSet.from_folder(tmp_path, Preprocess((8, 8), *UNIT), limit=5)) == 5
    with pytest.raises(LimitExceeded, match=r"^folder .*reading stopped at '5.png', after 5"):
        ImageSet.from_folder(tmp_path, Preprocess((8, 8), *UNIT))


def test_decoded_pixels_per_image_set_are_capped_before_decoding(monkeypatch):
    """The budget is spent from each header: the image that would go over it is not decoded."""
    uploads = [(f"{i}.png", _png(10, seed=i)) for i in range(5)]  # 100 pixels each
    monkeypatch.setenv("KCORE_MAX_REQUEST_PIXELS", "450")
    with pytest.raises(LimitExceeded) as info:
        ImageSet.from_uploads(uploads, Preprocess((8, 8), *UNIT))
    assert str(info.value).startswith("uploads: the decoded size of the images (4 read, 400 pixels, then '4.png' "
                                      "with 100) is 500 pixels; this server allows at most 450 decoded pixels")
    assert "(KCORE_MAX_REQUEST_PIXELS)" in str(info.value) and info.value.asked == 500
    monkeypatch.setenv("KCORE_MAX_REQUEST_PIXELS", "500")
    assert len(ImageSet.from_uploads(uploads, Preprocess((8, 8), *UNIT))) == 5


def test_image_set_built_from_arrays_or_kshapes_is_capped_too(monkeypatch):
    images = np.zeros((6, 8, 8, 3), np.uint8)
    monkeypatch.setenv("KCORE_MAX_IMAGES", "5")
    with pytest.raises(LimitExceeded, match=r"^mine: the number of images is 6; this server allows at most 5"):
        ImageSet(images, [str(i) for i in range(6)], [-1] * 6, Preprocess((8, 8)), source="mine")
    monkeypatch.delenv("KCORE_MAX_IMAGES")
    monkeypatch.setenv("KCORE_MAX_INPUT_BYTES", str(input_tensor_bytes(5, (8, 8))))
    with pytest.raises(LimitExceeded, match=r"model input of 6 images at 8×8.*KCORE_MAX_INPUT_BYTES"):
        ImageSet(images, [str(i) for i in range(6)], [-1] * 6, Preprocess((8, 8)))
    # kshapes is refused before any image is rendered
    monkeypatch.setenv("KCORE_MAX_INPUT_BYTES", str(input_tensor_bytes(10, (64, 64))))
    with pytest.raises(LimitExceeded, match=r"kshapes.* test: the model input of 11 images at 64×64"):
        ImageSet.from_kshapes(n=11)
    assert len(ImageSet.from_kshapes(n=10)) == 10


# ------------------------------------------------------------------------------------------------ input sizes
def test_card_resize_size_3000_is_refused(tmp_path, monkeypatch):
    data = {"architecture": "kc_tinynet", "num_classes": 10, "input_size": [224, 224], "extra": {"resize_size": 3000}}
    with pytest.raises(LimitExceeded) as info:
        ModelCard.from_dict(data, source="card 'm.card.json'")
    msg = str(info.value)
    assert msg.startswith("card 'm.card.json': 'extra.resize_size' (the shorter side images are resized to before "
                          "the centre crop) is 3,000; this server allows at most 2,048 pixels on the longest side")
    assert "(KCORE_MAX_INPUT_SIDE)" in msg and "Fix: give the resize the model was evaluated with" in msg
    # written beside a file, the same card is refused on reading
    path = tmp_path / "m.card.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LimitExceeded, match="'extra.resize_size'.*3,000"):
        read_card(path)
    for bad in ("3000", 0, 2.5, True):
        with pytest.raises(ValueError, match=rf"'extra.resize_size'.*must be a positive integer.*got {bad!r}.*Fix:"):
            ModelCard.from_dict({**data, "extra": {"resize_size": bad}})
    # the preprocessing refuses it too, however it is built
    with pytest.raises(LimitExceeded, match=r"^resize_size .* is 3,000.*KCORE_MAX_INPUT_SIDE"):
        Preprocessing((224, 224), resize_size=3000)
    with pytest.raises(LimitExceeded, match=r"resize_size .* is 2,341"):
        Preprocessing((224, 224), resize_size=256).with_overrides(input_size=(2048, 2048))
    with pytest.raises(LimitExceeded, match=r"^input_size .* is 2049×224.*KCORE_MAX_INPUT_SIDE"):
        Preprocessing((2049, 224))
    with pytest.raises(LimitExceeded, match=r"^input_size .* is 3000×3000.*Fix: use the size the model was trained"):
        Preprocess((3000, 3000))
    # the operator moves the cap both ways
    monkeypatch.setenv("KCORE_MAX_INPUT_SIDE", "4096")
    assert ModelCard.from_dict(data).extra["resize_size"] == 3000
    assert Preprocessing((224, 224), resize_size=3000).load_size == (3000, 3000)
    monkeypatch.setenv("KCORE_MAX_INPUT_SIDE", "200")
    with pytest.raises(LimitExceeded, match=r"'input_size'.* is \[224, 224\]; this server allows at most 200"):
        ModelCard.from_dict({**data, "extra": {}})


@needs_sample
def test_cli_refuses_a_card_with_resize_size_3000(tmp_path, capsys):
    from kcore.cli import main

    ckpt = tmp_path / "m.safetensors"
    shutil.copyfile(SAMPLE, ckpt)
    card = json.loads(card_path_for(SAMPLE).read_text())
    card.setdefault("extra", {})["resize_size"] = 3000
    card_path_for(ckpt).write_text(json.dumps(card))
    assert main(["layers", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kcore layers: error: ") and "'extra.resize_size'" in err and "3,000" in err
    assert "KCORE_MAX_INPUT_SIDE" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ classes
def test_num_classes_30m_and_1e10_in_a_card_are_refused(monkeypatch):
    base = {"architecture": "kc_tinynet", "input_size": [32, 32]}
    with pytest.raises(LimitExceeded) as info:
        ModelCard.from_dict({**base, "num_classes": 30_000_000}, source="uploaded model card")
    assert str(info.value).startswith("uploaded model card: 'num_classes' is 30,000,000; this server allows at most "
                                      "100,000 classifier outputs (num_classes) per model (KCORE_MAX_CLASSES). Fix: ")
    card = json.loads('{"architecture": "kc_tinynet", "num_classes": 1e10}')  # JSON gives a float
    with pytest.raises(ValueError, match=r"'num_classes' must be a positive integer; got 10000000000\.0\. Fix:"):
        ModelCard.from_dict(card, source="uploaded model card")
    monkeypatch.setenv("KCORE_MAX_CLASSES", "40000000")
    assert ModelCard.from_dict({**base, "num_classes": 30_000_000}).num_classes == 30_000_000
    # a card without num_classes cannot list more class names than the cap either
    monkeypatch.setenv("KCORE_MAX_CLASSES", "10")
    names = [f"c{i}" for i in range(11)]
    with pytest.raises(LimitExceeded, match=r"^card: the number of 'class_names' is 11; .* at most 10"):
        ModelCard.from_dict({**base, "class_names": names}, source="card")
    assert len(ModelCard.from_dict({**base, "class_names": names[:10]}).class_names) == 10


def test_build_model_caps_num_classes_before_allocating(monkeypatch):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(LimitExceeded, match=r"^num_classes is 30,000,000; this server allows at most 100,000 .*"
                                            r"\(KCORE_MAX_CLASSES\)\. Fix: pass the number of outputs"):
        build_model("resnet18", 30_000_000)  # 512 × 30 M float32 weights: 61 GB
    with pytest.raises(ValueError, match=r"num_classes must be a positive integer; got 10000000000\.0 \(float\)"):
        build_model("resnet18", 1e10)  # type: ignore[arg-type]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB: nothing was allocated
    monkeypatch.setenv("KCORE_MAX_CLASSES", "10")
    with pytest.raises(LimitExceeded, match="num_classes is 11; this server allows at most 10"):
        build_model("kc_tinynet", 11)
    assert build_model("kc_tinynet", 10).fc.out_features == 10


@needs_sample
def test_load_model_num_classes_30m_and_1e10_are_refused():
    from kcore.checkpoints import load_model

    with pytest.raises(LimitExceeded, match=r"num_classes is 30,000,000.*KCORE_MAX_CLASSES"):
        load_model(SAMPLE, num_classes=30_000_000)
    with pytest.raises(ValueError, match=r"num_classes must be a positive integer; got 10000000000\.0 \(float\)"):
        load_model(SAMPLE, num_classes=1e10)  # type: ignore[arg-type]


@needs_sample
def test_cli_num_classes_30m_and_1e10_are_refused(capsys):
    from kcore.cli import main

    assert main(["layers", str(SAMPLE), "--num-classes", "30000000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kcore layers: error: num_classes is 30,000,000; this server allows at most 100,000")
    assert "KCORE_MAX_CLASSES" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as info:
        main(["layers", str(SAMPLE), "--num-classes", "1e10"])
    assert info.value.code == 2 and "invalid int value: '1e10'" in capsys.readouterr().err


def test_dashboard_classes_field_is_capped(monkeypatch):
    """The Models page's Classes box cannot go past the cap (the server's value, here lowered to 77)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("KCORE_MAX_CLASSES", "77")
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    at.segmented_control(key="kc_src_A").set_value("upload").run()
    assert not at.exception, [e.value for e in at.exception]
    box = at.number_input(key="kc_ncls_A")
    assert box.label == "Classes" and box.max == 77 and box.min == 0


@needs_sample
def test_cli_layers_input_size_is_capped_before_the_dry_run(capsys, monkeypatch):
    """`kcore layers --input-size` runs the model at that size: the same side cap as a card's input_size."""
    from kcore.cli import main

    assert main(["layers", str(SAMPLE), "--input-size", "3000", "3000"]) == 2
    err = capsys.readouterr().err
    assert "--input-size 3000 3000" in err and "KCORE_MAX_INPUT_SIDE" in err and "Traceback" not in err
    assert main(["layers", str(SAMPLE), "--input-size", "0", "64"]) == 2
    assert "two positive integers" in capsys.readouterr().err
    monkeypatch.setenv("KCORE_MAX_INPUT_SIDE", "4000")  # the operator's cap moves the CLI's too
    assert main(["layers", str(SAMPLE), "--input-size", "48", "3000"]) == 0
