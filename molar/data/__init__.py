"""Raw-format readers, schema checks, the leave-one-out split and batching."""
