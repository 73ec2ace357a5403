"""Data: exports read into records (``readers``), checked (``validate``), split (``splits``),
augmented (``transforms``) and served to the model as torch datasets (``dataset``). No model code here."""
