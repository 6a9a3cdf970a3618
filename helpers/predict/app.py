"""A Gradio app for your own X-ray: upload 1 to 4 views (PNG, JPEG, DICOM, compressed or not), read the four-region
report and the attention overlays, inline in notebook 03. gradio is pinned in requirements.txt (with Pillow below 13,
as it requires) and imported only when the app is built; a headless run (papermill, nbconvert, a command) never
starts it. tests/test_predict.py serves it on 127.0.0.1 and drives it through gradio_client."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from ..core.data import DataError
from .viewer import interactive_frontend

FILE_TYPES = [".png", ".jpg", ".jpeg", ".dcm"]


def predict_uploads(predictor, files, out_dir: str | Path | None = None) -> tuple[str, list[str]]:
    """The app's handler: uploaded files (paths, or gradio's file objects) -> (report text, overlay PNG paths).
    A bad upload (not an image, more than 4 views, a corrupt file) comes back as the error text, naming the file."""
    paths = [getattr(f, "name", f) for f in files or []]
    try:
        result = predictor(paths, out_dir)
    except DataError as error:
        return f"Cannot read the upload: {error}", []
    text = result["report"]
    if result["attention_error"]:
        text += f"\n\n(attention overlays skipped: {result['attention_error']})"
    return text, [str(p) for p in result["overlays"]]


def build(predictor, out_dir: str | Path | None = None):
    """The app's Blocks (not started)."""
    import gradio as gr

    with gr.Blocks(title="Chest X-ray findings per region") as app:
        gr.Markdown(f"### {predictor.run.name}: chest X-ray findings per region\nUpload 1 to 4 views of one study "
                    f"(PNG, JPEG or DICOM). Research use only, not for clinical decisions.")
        files = gr.File(file_count="multiple", file_types=FILE_TYPES, label="views")
        button = gr.Button("Write the report")
        report = gr.Textbox(label="report", lines=5)
        overlays = gr.Gallery(label="attention per view (each region's tokens on the view's base tile)")
        button.click(partial(predict_uploads, predictor, out_dir=out_dir), inputs=files, outputs=[report, overlays],
                     api_name="report")
    return app


def launch(predictor, out_dir: str | Path | None = None, interactive: bool | None = None):
    """Start the app inline when a front end is there (Colab, Jupyter); a headless run prints why it did not.
    `interactive` overrides the check (`viewer.interactive_frontend`)."""
    if not (interactive_frontend() if interactive is None else interactive):
        print("Gradio app not started: headless run (no front end to show it); the cell above shows the same "
              "prediction")
        return None
    app = build(predictor, out_dir)
    app.launch(inline=True, share=False)
    return app
