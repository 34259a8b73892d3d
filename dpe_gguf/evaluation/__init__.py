"""The evaluation suite: seeded retrieval prompts and their scores (``tasks``), the methods compared and the
run, tables and JSON rows (``suite``), the plots (``plot``), and the demo (``demo``)."""
