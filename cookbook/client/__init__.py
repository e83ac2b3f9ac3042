"""The client side: everything that talks to a trainer service or a deployment, through the official Fireworks SDK.

`trainer` (ReconnectableClient), `session` (provisioning one run's trainer jobs and deployment), `sampler`
(rollouts from the deployment), `weight_sync` (pushing trainer weights to the deployment).
"""
