"""copyfree gateway: the public API (Check, Register, Recommend, Delete, Stats)."""

GATEWAY_SERVICE_NAME = "copyfree.v1.GatewayService"
