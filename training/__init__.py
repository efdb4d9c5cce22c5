"""Tools that build models: Medusa heads (train_medusa.py, on distilled answers: chat_prompts.py,
distill.py), the small pretrained fixture model (corpus.py, build_model.py), the tests' toy model
(toy_model.py) and the model cards (model_card.py). Run them as `python -m training.NAME`."""
