"""python app.py [--root runs] [--port 8501]: try a trained model on your own images, in a browser.

Streamlit on 127.0.0.1 only: pick a model.pt under the root, upload an image, see predict.py's
prediction (page and CLI agree) and every class's probability. Also `streamlit run app.py -- --root runs`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st
from PIL import Image
from streamlit import runtime

from trainable.errors import UserError

ROOT_ENV = "CIFAR_TUNE_RUNS"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.environ.get(ROOT_ENV, "runs"),
                   help=f"folder holding experiments (default: ${ROOT_ENV} or ./runs)")
    p.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1")
    return p.parse_args(argv)


def image_types() -> list[str]:
    """Every file extension Pillow can open (the uploader refuses the rest before reading them)."""
    Image.init()
    return sorted({ext.lstrip(".").lower() for ext, fmt in Image.registered_extensions().items()
                   if fmt in Image.OPEN})


def find_models(root: Path) -> list[Path]:
    """Every analysis/model.pt of an experiment under root (root itself may be an experiment), and
    the models of the recipes it was compared with (analysis/baselines/RECIPE/model.pt)."""
    root = Path(root).expanduser()
    found: set[Path] = set()
    for depth in ("", "*/", "*/*/"):  # an experiment, a storage folder, a storage folder of those
        found |= set(root.glob(f"{depth}analysis/model.pt")) | set(root.glob(f"{depth}analysis/baselines/*/model.pt"))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def launch(args: argparse.Namespace) -> None:
    """Run this file under Streamlit, bound to 127.0.0.1, headless, no usage statistics."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()),
           "--server.address", "127.0.0.1", "--server.port", str(args.port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
           "--server.fileWatcherType", "none",
           "--", "--root", str(args.root)]
    print(f"open http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    os.execv(sys.executable, cmd)  # becomes the server: Ctrl-C and kill reach Streamlit itself


@st.cache_resource(max_entries=4, show_spinner="loading the model ...")
def cached_model(path: str, mtime: float):  # mtime: a retrained model.pt is reloaded
    from predict import load_model  # lazy: the launcher execs Streamlit without loading torch
    return load_model(path)


def pick_model(root: Path) -> Path | None:
    """The model.pt chosen among those under root, or typed in; None when there is none."""
    models = find_models(root)
    labels = {str(p.relative_to(root)) if p.is_relative_to(root) else str(p): p for p in models}
    choice = st.selectbox(f"Trained model (found under {root})", list(labels)) if models else None
    if not models:
        st.info(f"No analysis/model.pt under {root}: run analyze.py on an experiment, start the app "
                f"with --root pointing at the runs folder, or type a path below.")
    typed = st.text_input("…or the path of a model.pt", value="", placeholder="runs/NAME/analysis/model.pt")
    return Path(typed).expanduser() if typed.strip() else labels.get(choice) if choice else None


def probability_chart(names: list[str], probs: list[float]) -> alt.Chart:
    """Every class's probability as a bar, most likely first and in red."""
    df = pd.DataFrame({"class": names, "probability": probs})
    df["shown as"] = ["predicted class"] + ["other classes"] * (len(df) - 1)
    return (alt.Chart(df, title=f"Probability of each of the {len(df)} classes")
            .mark_bar()
            .encode(x=alt.X("probability:Q", title="probability", axis=alt.Axis(format="%")),
                    y=alt.Y("class:N", sort="-x", title="class (most likely first)",
                            axis=alt.Axis(labelLimit=200, labelOverlap=False)),
                    color=alt.Color("shown as:N", title=None, legend=alt.Legend(orient="bottom"),
                                    scale=alt.Scale(domain=["predicted class", "other classes"],
                                                    range=["#d62728", "#1f77b4"])),
                    tooltip=["class", alt.Tooltip("probability:Q", format=".2%")])
            .properties(height=17 * len(df)))  # room for every class name


def page(args: argparse.Namespace) -> None:
    from predict import probabilities, read_image, to_model_input  # lazy, as in cached_model
    st.set_page_config(page_title="cifar-tune: predict", layout="centered")
    st.title("What does the model see?")
    path = pick_model(Path(args.root).expanduser().resolve())
    if path is None:
        return
    try:
        model = cached_model(str(path), path.stat().st_mtime if path.exists() else 0.0)
    except UserError as e:
        st.error(str(e))
        return
    st.caption(f"model: {path} ({len(model.names)} classes, input {model.input_size} px)")
    upload = st.file_uploader("Image (any size: it is shrunk to 32×32 like the training images)", type=image_types())
    if upload is None:
        return
    try:
        picture = read_image(upload, name=upload.name)  # the upright RGB picture the model gets
    except UserError as e:
        st.error(str(e))
        return
    probs = probabilities(model, [to_model_input(picture)])[0]
    order = probs.argsort(descending=True).tolist()
    left, right = st.columns([1, 2])
    left.image(picture, caption=upload.name, width="stretch")  # not the raw file: Pillow decoded it
    right.metric("Predicted class", model.names[order[0]])
    right.metric("Probability", f"{float(probs[order[0]]):.1%}")
    right.caption("Next: " + ", ".join(f"{model.names[i]} {float(probs[i]):.1%}" for i in order[1:5]))
    st.altair_chart(probability_chart([model.names[i] for i in order], [float(probs[i]) for i in order]),
                    width="stretch")


if __name__ == "__main__":
    if runtime.exists():
        page(parse(sys.argv[1:]))
    else:
        launch(parse())
