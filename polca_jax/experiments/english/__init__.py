"""The paper's English language-modelling experiment (§2.3–2.4 of the paper digest)."""
