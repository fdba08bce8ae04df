"""Ray actor shells around the plain classes of policy/, rewards/ and learner/."""
