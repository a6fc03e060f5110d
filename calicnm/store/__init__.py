"""The datastore: the key-value protocol (``kv``), its etcd adapter
(``etcd``), the key layout (``keys``), the records layer that classifies and
decodes every stored kind (``records``), and the compare-and-swap edits of
stored records (``edits``)."""
