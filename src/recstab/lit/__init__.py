"""Lightning pieces: the LightningModule, DataModules and callbacks."""
