"""Object storage: URIs, key layout and the S3 / local-folder stores."""
