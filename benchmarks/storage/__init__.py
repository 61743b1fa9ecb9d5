"""The ground floor beside ``data``: files written atomically and read safely."""
