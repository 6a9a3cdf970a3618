"""What every step shares: settings, storage, the run layout, data and DICOM, the report format, the LM loader, the
Colab start, the user-error types. Imports nothing else of helpers."""
