"""One readable entry per stage: config -> models -> data -> loop -> checkpoint."""
