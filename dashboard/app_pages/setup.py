"""Models & images: choose networks A and B, a layer of each, and the images to compare them on."""
from __future__ import annotations

import dataclasses
import json

import streamlit as st

from dashboard import ui
from dashboard.state import images, models, startup, views
from kcore.checkpoints import CHECKPOINT_KINDS
from kcore.features import estimate_feature_bytes, format_bytes
from kcore.groups import MAX_PATTERN_CHARS
from kcore.limits import limits
from kcore.preprocessing import IMAGENET_MEAN, IMAGENET_STD, preprocessing_of, resolve_preprocessing
from kcore.server_paths import ROOTS_ENV, server_paths_enabled

SOURCES = {"sample": "Sample", "upload": "Upload", "path": "Server"}  # short: the three fit a 1024 px window
IMAGE_SOURCES = {"bundled": "Bundled images", "upload": "Upload images or a zip", "folder": "Folder on the server"}
UPLOAD_TYPES = ["safetensors", "pt", "pth", "bin", "ckpt", "pt2", "zip"]
IMAGE_TYPES = ["png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff", "zip"]
AUTO_ARCH = "(from the model card)"
PREP_HELP = ("How images become this network's input: the values you set below, else its model card's, else (for a "
             "torchvision architecture) torchvision's standard evaluation transform (shorter side resized, centre "
             "crop, ImageNet mean and std). Recorded in every run's provenance.")
SERVER_PATHS_OFF = (f"Paths on the server are turned off on this server (it was started without {ROOTS_ENV}). "
                    "Upload the file instead, or ask whoever runs the server to allow folders with "
                    f"{ROOTS_ENV}=/data:/models.")

st.title("Models & images")
st.caption("Pick the two networks to compare, one layer of each, and the images. Everything starts on the "
           "bundled sample models and images, so you can go straight to **Fit**.")
if err := startup.default_error():
    st.warning(f"The embedded default could not be loaded: {err}")


def _architectures() -> list[str]:
    return models.architectures()  # an allow-list: the browser picks a listed name, never types one


def _arch_inputs(role: str) -> tuple[str | None, int | None]:
    c1, c2 = st.columns([3, 2])
    arch = c1.selectbox("Architecture", [AUTO_ARCH] + _architectures(), key=f"kc_arch_{role}",
                        help="Needed for weights-only files (safetensors, state dicts) without a model card. "
                             "TorchScript and torch.export files carry their own.", persist_state="session")
    ncls = c2.number_input("Classes", min_value=0, max_value=limits().max_classes, value=None, step=1,
                           key=f"kc_ncls_{role}", placeholder="auto",
                           help="Number of classifier outputs; empty (or 0) = from the card or inferred from the "
                                "weights (the number used is shown with the loaded model below).",
                           persist_state="session")
    return (None if arch == AUTO_ARCH else arch), (int(ncls) or None if ncls is not None else None)


def _ui_message(role: str, exc: Exception) -> str:
    """The core's error, with its fix said in terms of this page's controls (not the Python API)."""
    msg = str(exc)
    where = f"network {role}'s"
    argument = getattr(exc, "argument", None)  # kcore.arguments.ArgumentError: the argument its fix is about
    if argument == "arch":
        head = msg.split(" holds weights only")[0]
        return (f"{head} holds weights only, so its architecture is needed. Fix: choose it in {where} "
                "**Architecture** box (below the upload), or upload its model card (.json) beside it.")
    if argument == "num_classes" and "cannot be inferred" in msg:
        head = msg.split(": the number of classes")[0]
        return (f"{head}: the number of classifier outputs is not in a model card and cannot be inferred. "
                f"Fix: enter it in {where} **Classes** box.")
    return msg


def _use(role: str, load, source: str, path: str | None) -> None:
    """Load with ``load()``; on success make it network ``role``; on failure leave ``role`` empty (never a
    previous model that the user may take for the new one)."""
    try:
        loaded = models.with_override(role, load())
        new = models.make_slot(loaded, source, path, images.image_size(images.images()))
    except (ValueError, FileNotFoundError) as exc:
        models.clear_slot(role)
        st.error(f"Could not use this checkpoint: {_ui_message(role, exc)}")
        return
    current = models.slot(role)
    same_model = current is not None and current.loaded.sha256 == loaded.sha256 and current.input_size == new.input_size
    if not same_model:
        models.forget_layer(role)  # the new model starts on its default layer
    if not same_model or (current.source, current.path, current.loaded.card, current.loaded.preprocessing) != (
            source, path, loaded.card, loaded.preprocessing):
        models.set_slot(role, new)
    if loaded.missing_keys or loaded.unexpected_keys:
        st.warning(f"Loaded with differences: missing {list(loaded.missing_keys)[:5]}, "
                   f"unexpected {list(loaded.unexpected_keys)[:5]}.")


def model_panel(role: str) -> None:
    """Choose network ``role`` (a sample, an upload or a server path) and load it."""
    st.subheader(f"Network {role}")
    # a new source empties the slot at once (model, card and layers), before anything is drawn
    source = st.segmented_control("Source", list(SOURCES), format_func=SOURCES.get, key=f"kc_src_{role}",
                                  default="sample", required=True, persist_state="session",
                                  help="Sample: a bundled model · Upload: a file from this computer · Server: a "
                                       "file on the server (for files over the upload limit).",
                                  on_change=models.clear_slot, args=(role,))
    if source == "sample":
        samples = models.sample_models()
        if not samples:
            st.warning("No sample models in this checkout (sample_models/).")
        else:
            names = list(samples)
            default = models.DEFAULT_PAIR[0 if role == "A" else 1]
            name = st.selectbox("Sample model", names, index=names.index(default) if default in names else 0,
                                key=f"kc_sample_{role}", persist_state="session",
                                help="Small networks trained on the bundled kshapes images; their model cards "
                                     "give the architecture, preprocessing and test accuracy.")
            cur = models.slot(role)
            if cur is None or cur.path != str(samples[name]):
                _use(role, lambda: models.load_path(str(samples[name])), "sample", str(samples[name]))
    elif source == "upload":
        up = st.file_uploader("Checkpoint", type=UPLOAD_TYPES, key=f"kc_upload_{role}",
                              help="safetensors, a weights-only state dict (.pt/.pth/.bin), TorchScript or "
                                   "torch.export (.pt2). A full pickle is never loaded from the browser. "
                                   "Bigger than the upload limit? Use 'Server' (a file on the server).")
        card_up = st.file_uploader("Model card (optional, .json)", type=["json"], key=f"kc_cardup_{role}",
                                   help="The <name>.card.json written beside a checkpoint: architecture, "
                                        "classes, input size and normalisation.")
        cur = models.slot(role)
        if up is None and cur is not None and cur.source == "upload":
            # the upload box is new after a page change, but the network uploaded before is still loaded
            st.caption(f"In use: **{cur.loaded.name}**, uploaded earlier in this session. Upload another file "
                       "to replace it.")
        arch, ncls = _arch_inputs(role)
        if up is not None:
            card_json = card_up.getvalue().decode("utf-8") if card_up is not None else None
            if card_json is not None:
                try:
                    json.loads(card_json)
                except json.JSONDecodeError as exc:
                    st.error(f"The model card is not valid JSON: {exc}")
                    card_json = None
            data = up.getvalue()
            _use(role, lambda: models.load_bytes(data, up.name, arch, ncls, card_json), "upload", None)
    elif not server_paths_enabled():
        st.info(SERVER_PATHS_OFF)
    else:
        path = st.text_input("Path on the server", key=f"kc_path_{role}", placeholder="/data/models/resnet18.pth",
                             help="For files over the upload limit. A model card <name>.card.json beside the "
                                  "file is read automatically.", persist_state="session")
        arch, ncls = _arch_inputs(role)
        if st.button("Load", key=f"kc_loadpath_{role}", disabled=not path):
            _use(role, lambda: models.load_server_path(path, arch, ncls), "path", path)
    model_card(role)


def model_card(role: str) -> None:
    """The loaded network's card (name, hash, parameters, card facts, preprocessing) and its editor."""
    s = models.slot(role)
    if s is None:
        st.info(f"No network {role} yet: " + {"sample": "pick a sample model.", "upload": "upload a checkpoint above.",
                                              "path": "give its path and press Load."}.get(
            views.widget_value(f"kc_src_{role}", "sample"), "choose one above."))
        return
    m, card = s.loaded, s.loaded.card
    with st.container(border=True, key=f"kc_card_{role}"):
        st.markdown(f"**{m.name}** · `{m.short_hash}` · {m.num_parameters:,} parameters · {m.kind}")
        facts = []
        if card is not None:
            if card.architecture:
                facts.append(f"architecture {card.architecture}")
            if card.dataset:
                facts.append(f"trained on {card.dataset}")
            if card.test_accuracy is not None:
                facts.append(f"test accuracy {card.test_accuracy:.1%}")
        elif m.architecture:
            facts.append(f"architecture {m.architecture}")
        if m.num_classes is not None:
            given = card is not None and card.num_classes == m.num_classes
            facts.append(f"{m.num_classes} classes" + ("" if given else " (inferred from the weights)"))
        facts.append(f"input {s.input_size[1]}×{s.input_size[2]}")
        st.caption(" · ".join(facts) + f" · {CHECKPOINT_KINDS.get(m.kind, m.kind).split(';')[0]}")
        prep = preprocessing_of(m)
        st.caption(f"Preprocessing: {prep.describe()}", help=PREP_HELP)
        preprocessing_editor(role, s, prep)


def _triple(values, default) -> tuple[float, float, float]:
    return tuple(float(v) for v in (values if values and len(values) == 3 else default))


def preprocessing_editor(role: str, s: models.ModelSlot, prep) -> None:
    """Input size, mean and std of network ``role``, editable; and its model card to save."""
    m = s.loaded
    with st.expander("Input size, normalisation and model card", expanded=False):
        h0, w0 = prep.input_size or (s.input_size[1], s.input_size[2])
        mean0, std0 = _triple(prep.mean, IMAGENET_MEAN), _triple(prep.std, IMAGENET_STD)
        key = f"kc_prep_{role}_{m.short_hash}"
        c = st.columns(2)
        h = c[0].number_input("Input height", 8, 2048, int(h0), key=f"{key}_h")
        w = c[1].number_input("Input width", 8, 2048, int(w0), key=f"{key}_w")
        st.caption("Mean and std of [0, 1] RGB (R, G, B)")
        mc, sc = st.columns(3), st.columns(3)
        mean = tuple(mc[i].number_input(f"mean {ch}", 0.0, 1.0, mean0[i], step=0.001, format="%.3f",
                                        key=f"{key}_m{i}") for i, ch in enumerate("RGB"))
        std = tuple(sc[i].number_input(f"std {ch}", 0.001, 10.0, std0[i], step=0.001, format="%.3f",
                                       key=f"{key}_s{i}") for i, ch in enumerate("RGB"))
        b1, b2 = st.columns(2)
        if b1.button("Apply", key=f"{key}_apply", type="primary"):
            new = prep.with_overrides((int(h), int(w)), mean, std, what="set on the Models page")
            models.set_preprocessing_override(role, m.sha256, new)
            models.set_slot(role, models.make_slot(dataclasses.replace(m, preprocessing=new), s.source, s.path,
                                                 (int(h), int(w))))
            models.forget_layer(role)
            st.rerun()
        if models.preprocessing_override(role, m.sha256) is not None and b2.button("Reset", key=f"{key}_reset"):
            models.set_preprocessing_override(role, m.sha256, None)
            base = dataclasses.replace(m, preprocessing=resolve_preprocessing(m.card, m.architecture))
            models.set_slot(role, models.make_slot(base, s.source, s.path, images.image_size(images.images())))
            st.rerun()
        if s.source == "sample":
            return
        # a download only: the dashboard never writes beside a checkpoint on the server (outside its own folders)
        st.caption("A model card records the architecture, the number of classes and this preprocessing; kcore "
                   "reads it when it finds it beside the checkpoint as <name>.card.json. Download it and keep it "
                   "there (or upload it with the checkpoint).")
        stem = m.name.rsplit(".", 1)[0]
        st.download_button("Download the model card", models.card_text(s), file_name=f"{stem}.card.json",
                           mime="application/json", key=f"{key}_download", on_click="ignore")


def _layer_label(s: models.ModelSlot, name: str) -> str:
    shape = s.shape_of(name)
    info = next(layer for layer in s.layers if layer.name == name)
    return f"{name}  ·  {info.type}  ·  {'×'.join(str(v) for v in shape)}"


def layer_picker(role: str) -> str | None:
    """The layer picker of network ``role``, or None without a network or a 4-D layer."""
    s = models.slot(role)
    if s is None:
        return None
    names = s.layer_names
    if not names:
        st.error(f"Network {role} has no layer with a 4-D (N, C, H, W) output to compare.")
        return None
    key = models.layer_key(role)
    models.keep_layer(role)
    return st.selectbox(f"Layer of {role} (C × H × W)", names, key=key, format_func=lambda n: _layer_label(s, n),
                        help="Type to search. Only layers with spatial outputs are listed, with the output shape "
                             f"for a {s.input_size[1]}×{s.input_size[2]} input.", persist_state="session")


def alignment_note(a: models.ModelSlot, la: str, b: models.ModelSlot, lb: str) -> None:
    """How the two chosen layers line up: spatial resampling and channels."""
    sa, sb = a.shape_of(la), b.shape_of(lb)
    notes = []
    if tuple(sa[1:]) == tuple(sb[1:]):
        notes.append(f"Same spatial size {sa[1]}×{sa[2]}: no resampling.")
    else:
        notes.append(f"Spatial sizes differ ({sa[1]}×{sa[2]} vs {sb[1]}×{sb[2]}): for A → B, A's map x is resampled "
                     f"bilinearly to B's {sb[1]}×{sb[2]} (x*'s size); for B → A, B's map to {sa[1]}×{sa[2]}.")
    if sa[0] != sb[0]:
        notes.append(f"Channels differ ({sa[0]} vs {sb[0]}); that is fine: g_θ maps the source's channels to the "
                     "target's.")
    else:
        notes.append(f"Both have {sa[0]} channels.")
    (st.info if tuple(sa[1:]) != tuple(sb[1:]) else st.success)(" ".join(notes))


def grouping_panel() -> None:
    """Say which images belong together (by subfolder or a file-name pattern): a fit keeps each group on one side
    of its split, and the intervals resample whole groups."""
    cur = images.images()
    if cur is None or cur.kind == "bundled":
        return
    how = st.selectbox("Images that belong together", list(images.GROUPINGS), format_func=images.GROUPINGS.get,
                       key="kc_img_groups", help="Crops of one photo, frames of one video or pictures of one subject "
                       "are nearly the same image: a fit never puts one group in both its training and held-out "
                       "images, and the error bars resample whole groups.")
    pattern = ""
    if how == "pattern":
        pattern = st.text_input("File-name pattern (one group in parentheses)", key="kc_img_pattern",
                                max_chars=MAX_PATTERN_CHARS, placeholder=r"^(.*)_crop\d+",
                                help=r"A regular expression with one group, applied to each file name: names with "
                                r"the same captured part form a group (^(.*)_crop\d+ groups cat_crop1.png with "
                                "cat_crop2.png); a name it does not match is its own group.")
    want = (how, pattern)
    if cur.grouping != want and (how != "pattern" or pattern):
        grouped = ui.guarded(lambda: images.group_images(cur, how, pattern), "Groups")
        images.set_images(grouped if grouped is not None else images.group_images(cur, "none"))
    groups = getattr(images.images().images, "groups", None)
    st.caption(groups.describe() if groups is not None else "Every image is its own group.")


def images_panel() -> None:
    """Choose the image set (bundled, a server folder or an upload) and its size."""
    st.subheader("Images")
    src = st.segmented_control("Source", list(IMAGE_SOURCES), format_func=IMAGE_SOURCES.get, key="kc_img_src",
                               default="bundled", required=True, persist_state="session")
    if src == "bundled":
        n = st.slider("Number of bundled images", 60, 2000, images.DEFAULT_N_IMAGES, step=20, key="kc_img_n",
                      persist_state="session",
                      help="kshapes test images, rendered from code. 20 % are held out: never used to fit g_θ, "
                           "and every map and number is shown on them.")
        cur = images.images()
        if cur is None or cur.kind != "bundled" or cur.n != n:
            imgs = ui.guarded(lambda: images.bundled_images(int(n)), "Bundled images")
            if imgs is not None:
                images.set_images(images.ImageChoice(imgs, f"bundled kshapes test images ({n})", "bundled"))
    elif src == "upload":
        files = st.file_uploader("Images or a zip of images", type=IMAGE_TYPES, accept_multiple_files=True,
                                 key="kc_img_upload", help="At least a few dozen images; 20 % are held out. "
                                                           "They are used as soon as they are uploaded.")
        if files:  # used as soon as uploaded (decoded once per set of files)
            token = images.upload_token([(f.name, f.size) for f in files])
            cur = images.images()
            if cur is None or cur.token != token:
                imgs = ui.guarded(lambda: images.uploaded_images([(f.name, f.getvalue()) for f in files],
                                                                images.working_image_size()), "Uploaded images")
                if imgs is not None:
                    images.set_images(images.ImageChoice(imgs, f"{len(imgs)} uploaded images", "upload", token))
        elif images.images() is not None and images.images().kind != "upload":
            st.info(f"No images uploaded yet: a fit now still uses the {images.images().description}.")
    elif not server_paths_enabled():
        st.info(SERVER_PATHS_OFF)
    else:
        folder = st.text_input("Folder on the server", key="kc_img_folder", placeholder="/data/images",
                               help="Images directly inside it, or one subfolder per class.", persist_state="session")
        if st.button("Use this folder", key="kc_img_use_folder", disabled=not folder, type="primary"):
            imgs = ui.guarded(lambda: images.folder_images(folder, images.working_image_size()), "Image folder")
            if imgs is not None:
                images.set_images(images.ImageChoice(imgs, f"folder {folder} ({len(imgs)} images)", "folder"))
    grouping_panel()
    cur = images.images()
    if cur is not None:
        st.caption(f"Using **{cur.description}**.")
        skipped = getattr(cur.images, "skipped", ())
        if skipped:
            st.warning(f"{len(skipped)} file(s) were skipped: "
                       + "; ".join(f"{name}: {why}" for name, why in skipped[:5]))
        thumbs = [cur.images.raw(i) for i in range(min(8, cur.n))]
        if thumbs:
            st.image(thumbs, width=64, caption=[str(cur.images.ids[i]).split("/")[-1] for i in range(len(thumbs))])


left, right = st.columns(2, gap="large")
with left:
    model_panel("A")
with right:
    model_panel("B")

st.divider()
st.subheader("Layers")
la_col, lb_col = st.columns(2, gap="large")
with la_col:
    layer_a = layer_picker("A")
with lb_col:
    layer_b = layer_picker("B")
a, b = models.slot("A"), models.slot("B")
estimate = st.empty()  # filled after the images panel, so it counts images uploaded in this very run
if a is not None and b is not None and layer_a and layer_b:
    alignment_note(a, layer_a, b, layer_b)

st.divider()
images_panel()
imgs = images.images()
if a is not None and b is not None and layer_a and layer_b and imgs is not None:
    need = estimate_feature_bytes(imgs.n, a.shape_of(layer_a), b.shape_of(layer_b))
    estimate.caption(f"Features of {imgs.n} images ({imgs.description}) take about {format_bytes(need)} in memory.")
st.page_link("app_pages/fit.py", label="Next: Fit", icon=":material/play_arrow:")
