"""Sweeps: the fold x threshold grid on Ray Tune, one Ray Train run a trial."""
