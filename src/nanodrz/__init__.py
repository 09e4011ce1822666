"""nanodrz: speaker diarization as sequence generation."""
__version__ = "0.1.0"
