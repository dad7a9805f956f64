"""Statistics used by the studies, each checked in tests against scipy / sklearn / statsmodels / numpy."""
