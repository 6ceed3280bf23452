"""The human annotation web app (`rlhf serve`): people rank each prompt's responses and judge two models side by
side; their labels are ordinary rows of the response library. See app.py for the map and security.py for the
safety model."""
