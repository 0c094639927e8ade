"""Value types shared by every layer: identities, statements, decisions, errors."""
