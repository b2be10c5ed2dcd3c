//! Label embeddings from word vectors (paper appendix A.2). OWNER: text helper.
