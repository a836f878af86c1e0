"""Code the tests share (fork server, probe callbacks, checkpoint writers, readers); no tests here."""
