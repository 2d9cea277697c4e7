"""Pictures of a backbone and of a run: the last block's [CLS] attention maps and their masks
(`attention`), attention videos (`attention_video`) and training curves (`plotting`)."""
