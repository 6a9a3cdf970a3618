"""Your own X-ray: a trained run's four-region report for 1 to 4 views of one study (8- or 16-bit PNG, JPEG, DICOM),
and an attention overlay per view. `python -m helpers predict`, notebook 03's predict cell and the Gradio app
(helpers/predict/app.py) all call `Predictor`."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ..model.attention import analyze_study
from ..core.data import DataError, Study, study_images
from ..model.generation import default_max_new_tokens, generate_batch
from ..model.modeling import load_for_inference
from ..evaluate.plots import plot_heatmaps
from ..core.report_format import format_report

MAX_VIEWS = 4  # a study's views, as IU X-Ray has them


def check_views(paths) -> list[Path]:
    """1 to 4 existing files, or a DataError naming them."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no image given: pass 1 to 4 views of one study (PNG, JPEG or DICOM)")
    if len(paths) > MAX_VIEWS:
        raise DataError(f"{len(paths)} images given ({', '.join(map(str, paths))}): one study has 1 to {MAX_VIEWS} "
                        f"views")
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
    return paths


def save_overlays(analysis: dict, out_dir: str | Path) -> list[Path]:
    """One PNG per view: each region's attention on the view's base tile over the X-ray (`plots.plot_heatmaps`)."""
    paths = []
    for i, view in enumerate(analysis["views"]):
        one_view = {"id": analysis["id"], "views": [view],
                    "heatmaps": {region: [maps[i]] for region, maps in analysis["heatmaps"].items()}}
        paths.append(Path(out_dir) / f"{analysis['id']}_view{i + 1}_attention.png")
        plot_heatmaps(one_view, paths[-1], first_view=i + 1)
        plt.close("all")
    return paths


class Predictor:
    """A notebook-02 run's model (base + adapter), processor and config.json, for any number of studies."""

    def __init__(self, run, model, processor, config: dict, max_new_tokens: int | None = None):
        self.run, self.model, self.processor, self.config = run, model, processor, config
        self.max_new_tokens = max_new_tokens or default_max_new_tokens(config)

    @classmethod
    def load(cls, run, load_in_4bit: bool | None = None, *, small_gpu: bool = False,
             max_new_tokens: int | None = None) -> Predictor:
        """`modeling.load_for_inference` (notebook 03 passes the model it has loaded to the constructor instead)."""
        return cls(run, *load_for_inference(run, load_in_4bit, small_gpu=small_gpu), max_new_tokens=max_new_tokens)

    def __call__(self, paths, out_dir: str | Path | None = None, *, attention: bool = True,
                 study_id: str | None = None) -> dict:
        """The report of one study's views: `regions`, `report` (four lines), `confidence` per region, the views
        used and `overlays` (PNG paths in `out_dir`, default generate/<run>/predict/). The attention maps are a
        diagnostic: when they fail (e.g. eager attention does not fit in memory) `attention_error` says why and the
        report is still returned."""
        paths = check_views(paths)
        # IU X-Ray's layout, <study>/0.png: the folder names the study; otherwise the first file does
        name = f"{paths[0].parent.name}_{paths[0].stem}" if paths[0].stem.isdigit() else paths[0].stem
        study = Study(id=study_id or name, split="predict", regions=None, original_report=None, image_paths=paths)
        views = study_images(study)  # every file read (a bad one is named) before the model runs
        max_views = self.config["max_views"]
        if len(views) > max_views:
            print(f"run {self.run.name} was trained on up to {max_views} views: "
                  f"{', '.join(p.name for p in paths[max_views:])} left out")
        record = generate_batch(self.model, self.processor, [views[:max_views]], [study.id],
                                max_new_tokens=self.max_new_tokens)[0]
        result = {**record, "report": format_report(record["regions"]), "files": [str(p) for p in paths[:max_views]],
                  "overlays": [], "attention_error": None}
        if attention:
            try:
                analysis = analyze_study(self.model, self.processor, study, max_views=max_views,
                                         max_new_tokens=self.max_new_tokens)
                result["overlays"] = save_overlays(analysis, out_dir or self.run.generate_dir / "predict")
            except Exception as error:  # noqa: BLE001  a diagnostic: named, never blocks the report
                result["attention_error"] = f"{type(error).__name__}: {error}"
        return result


def in_words(result: dict) -> str:
    """What `python -m helpers predict` prints."""
    lines = [f"{result['id']} ({', '.join(result['files'])}):", result["report"]]
    if not result["parsed"]:
        lines.append(f"(the answer did not parse into the four regions; raw text: {result['text']!r})")
    lines += [f"attention overlay: {path}" for path in result["overlays"]]
    if result["attention_error"]:
        lines.append(f"attention overlays skipped: {result['attention_error']}")
    return "\n".join(lines)
