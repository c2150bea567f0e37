"""garden in other people's training loops: callbacks for the Hugging Face `Trainer`
(`garden.integrations.transformers`) and Lightning (`garden.integrations.lightning`), both thin shells
around `garden.monitor.WeightMonitor`."""
