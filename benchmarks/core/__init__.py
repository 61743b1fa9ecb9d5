"""One experiment: settings, loss specs, models, training, the files of runs and of an --out folder."""
