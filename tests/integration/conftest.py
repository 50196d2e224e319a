# Integration fixtures: each helper module registers its fixtures here.
