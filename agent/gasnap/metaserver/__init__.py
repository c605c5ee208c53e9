"""The reference metadata service: the contract's protocol over one store."""
