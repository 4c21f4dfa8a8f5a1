# Variables Kiln passes to every build; undeclared ones are ignored (the list is in the README).
variable "kiln_transition" {
  type = string
}
variable "kiln_agent_url" {
  type = string
}
variable "kiln_agent_token" {
  type      = string
  sensitive = true
}
variable "kiln_agent_command" {
  type = string
}
variable "kiln_data_dir" {
  type = string
}
variable "kiln_build" {
  type = string
}
variable "greeting" {
  type = string
}

locals {
  home = "${var.kiln_data_dir}/home"
  pid  = "${var.kiln_data_dir}/agent.pid"
}

# Persistent: made by the first start, kept across stops, removed when the workspace is deleted.
resource "terraform_data" "home" {
  input = local.home

  provisioner "local-exec" {
    command = "mkdir -p '${self.input}' && echo '${var.greeting}' > '${self.input}/.greeting'"
  }

  provisioner "local-exec" {
    when    = destroy
    command = "rm -rf '${self.input}'"
  }
}

# Ephemeral: the agent runs while the workspace is started; every start build replaces it (a new token).
resource "terraform_data" "agent" {
  count            = var.kiln_transition == "start" ? 1 : 0
  depends_on       = [terraform_data.home]
  triggers_replace = [var.kiln_build]
  input = {
    home = local.home
    pid  = local.pid
  }

  provisioner "local-exec" {
    working_dir = self.input.home
    command     = "setsid ${var.kiln_agent_command} >> ../agent.log 2>&1 < /dev/null & echo $! > '${self.input.pid}'"
    environment = {
      HOME             = self.input.home
      KILN_AGENT_URL   = var.kiln_agent_url
      KILN_AGENT_TOKEN = var.kiln_agent_token
    }
  }

  # Stops the agent's whole process group (setsid made it the leader).
  provisioner "local-exec" {
    when    = destroy
    command = "if [ -f '${self.input.pid}' ]; then kill -TERM -$(cat '${self.input.pid}') 2>/dev/null; rm -f '${self.input.pid}'; fi; true"
  }
}

output "home" {
  value = local.home
}
