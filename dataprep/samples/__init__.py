"""The sample format and how samples are made: `make` (photo and studio samples and the member
names they hold, in one place), `detection`, `detect_stage` and `tiny_detector` (face detection
for photos, in the task or as a Ray actor stage), `preview` (contact sheets, anchor overlays)."""
