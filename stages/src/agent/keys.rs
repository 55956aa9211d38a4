//! The agent's keys in a stage table, declared once for every stage that runs the agent loop
//! (`trajectories`, judge rescue, `evaluate`). serde cannot flatten a struct into one that denies
//! unknown keys, so [`with_agent_keys!`](crate::with_agent_keys) adds the keys to the stage's
//! parameters struct instead, with the `trajectories` defaults, and an `agent_settings` method.

/// Default of `max_turns` (the recipe's).
pub fn default_max_turns() -> u32 {
    10
}

/// Default of `template`.
pub fn default_template() -> String {
    super::DEFAULT_TEMPLATE.into()
}

/// Declares a parameters struct with its own fields, then the agent's keys: `max_turns`
/// (default 10), `template` (default `trajectory_system.j2`), `sandbox` (the sandbox limits),
/// `isolation` and `parallel`; and `agent_settings(teacher)`, the [`super::AgentSettings`] they
/// describe.
#[macro_export]
macro_rules! with_agent_keys {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($(#[$field_meta:meta])* $field_vis:vis $field:ident : $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $($(#[$field_meta])* $field_vis $field: $ty,)*
            /// Most assistant turns per trajectory. Default: 10.
            #[serde(default = "crate::agent::keys::default_max_turns")]
            pub max_turns: u32,
            /// System prompt template. Default: `trajectory_system.j2`.
            #[serde(default = "crate::agent::keys::default_template")]
            pub template: String,
            /// Sandbox limits (memory, timeouts, output, SQL and scratch caps). Default: the
            /// recipe's.
            #[serde(default)]
            pub sandbox: kiln_sandbox::Limits,
            /// Isolation: `bubblewrap` or `landlock`. Default: the first that works here.
            #[serde(default)]
            pub isolation: Option<kiln_sandbox::Isolation>,
            /// Trajectories in progress at once (each holds a Python worker). Default: the
            /// model's `max_concurrency`, or twice the CPU count when scripted.
            #[serde(default)]
            pub parallel: Option<usize>,
        }

        impl $name {
            /// The agent these parameters describe, with `teacher`.
            fn agent_settings(&self, teacher: $crate::agent::TeacherSpec) -> $crate::agent::AgentSettings {
                $crate::agent::AgentSettings {
                    teacher,
                    max_turns: self.max_turns,
                    template: self.template.clone(),
                    sandbox: self.sandbox.clone(),
                    isolation: self.isolation,
                    parallel: self.parallel,
                }
            }
        }
    };
}
