//! Data: ImageFolder trees -> WebDataset tar shards -> decoded, augmented batches. OWNER: data helper.
