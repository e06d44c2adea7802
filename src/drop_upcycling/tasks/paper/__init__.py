"""The paper's evaluation suite as an lm-eval group (``du_paper``) plus the tasks lm-eval lacks."""
