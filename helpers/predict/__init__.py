"""Your own X-ray: a trained run's report and attention overlays for 1 to 4 views, the Gradio app, notebook 03's
viewer. Imports core, model, evaluate."""
