"""The ``calicnm`` command line: ``main`` is its composition root; the
commands are grouped by what they manage."""
