"""Per-protocol session engines: drive codecs, ask the policy, emit audit records."""
