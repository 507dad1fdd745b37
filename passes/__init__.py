"""Graph passes: float FX graph -> QDQ graph. Installed as ``qcompiler.passes``; see README.md here."""
