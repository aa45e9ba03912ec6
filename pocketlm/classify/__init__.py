"""Sequence classification on any pocketlm model: a linear head on the last real token's hidden state.

- data.py     read labelled CSV/TSV/JSONL (CS224N files as they are), classes, seeded splits, encoding
- model.py    the head (`score`), hidden states without the LM head, padding-independent pooling
- io.py       ClassifierInfo, checkpoints that transformers (AutoModelForSequenceClassification) and
              PEFT (modules_to_save) load, load_classifier
- train.py    the batch source, objective and validation metric the training loop runs
- finetune.py `pocketlm finetune --task classify`: data, splits, model and method, then the trainer
- predict.py  batched inference and `pocketlm eval RUN --classify FILE`
- metrics.py  accuracy, macro-F1, per-class precision/recall, confusion matrix
"""
