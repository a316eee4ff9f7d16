"""Tests of the history checkers in `clusters/checkers/`."""
