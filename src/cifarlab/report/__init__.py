"""Records on disk, pandas frames, seaborn figures and HTML pages."""
