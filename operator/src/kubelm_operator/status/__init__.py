"""Pure status computation: what the operator observed in, the custom resource's status out."""
