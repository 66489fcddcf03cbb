"""The outbound side: traffic from the local application to its dependencies (see ``stack``)."""
