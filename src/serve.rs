//! `prism serve`: loads the model, binds `serve.addr` and runs `prism-serve`
//! until Ctrl-C.

use anyhow::Context;
use prism_serve::{Config, default_name};

pub fn main(model: &prism_model::Config, serve: &Config, seed: u64) -> anyhow::Result<()> {
    let opts = model.load_options(seed)?;
    let started = std::time::Instant::now();
    let loaded = prism_model::load(&model.source, &opts)
        .with_context(|| format!("loading {}", model.source))?
        .with_chat_template_kwargs(&model.chat_template_kwargs)
        .context("model.chat_template_kwargs")?;
    let name = if serve.name.is_empty() { default_name(&model.source) } else { serve.name.clone() };
    tracing::info!(model = %model.source, name = %name, seconds = started.elapsed().as_secs_f64(), "model loaded");
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&serve.addr).await.with_context(|| format!("binding {}", serve.addr))?;
        let addr = listener.local_addr()?;
        println!("prism serve: `{name}` listening on http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        Ok(prism_serve::run(listener, serve, loaded, name, shutdown).await?)
    })
}
