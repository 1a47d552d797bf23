"""Domain: models, names, resource units and the error tree. Imports nothing of blixard."""
