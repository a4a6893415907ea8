"""Deployment: the server that follows a registry alias (:mod:`.follower`,
:mod:`.app`, :mod:`.server`), running it as a process (:mod:`.process`),
predicting on files (:mod:`.files`) and exports (:mod:`.export`)."""
