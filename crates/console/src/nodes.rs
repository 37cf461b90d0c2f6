//! The Nodes page: every `strata serve` node sharing this catalog, with its
//! API address, version, start, last heartbeat, whether it is live and how
//! many instances it owns (`strata_service::Service::nodes_health`; leases
//! in docs/DESIGN.md, "Ownership leases"). Any node serves the same page.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::DateTime;
use maud::{html, Markup};
use strata_service::{NodeHealth, NodeState};

use crate::layout::{self, badge, sort_th, sort_time, time, Section};
use crate::{html_response, ConsoleState, Page};

/// `GET /console/nodes`.
pub async fn page(State(state): State<Arc<ConsoleState>>, page: Page) -> Response {
    // A catalog read: on the blocking pool.
    let reader = Arc::clone(&state);
    let nodes = tokio::task::spawn_blocking(move || {
        reader
            .service
            .nodes_health()
            .map_err(strata_api::ApiError::from)
    })
    .await
    .unwrap_or_else(|e| {
        Err(strata_api::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("reading the nodes stopped: {e}"),
        ))
    });
    let body = match nodes {
        Ok(nodes) => list(&nodes),
        Err(e) => layout::error_box("The nodes could not be read:", &e),
    };
    html_response(
        StatusCode::OK,
        layout::page("Nodes", Some(&page.who), Section::Nodes, page.flash, body),
    )
}

fn health(state: NodeState) -> Markup {
    match state {
        NodeState::Live => badge("ok", "Live"),
        NodeState::Left => badge("neutral", "Left"),
        NodeState::Lost => badge("err", "Lost"),
    }
}

fn list(nodes: &[NodeHealth]) -> Markup {
    let live = nodes.iter().filter(|n| n.state == NodeState::Live).count();
    html! {
        div.pagehead {
            div {
                h1 { "Nodes" }
                p.muted {
                    (nodes.len()) (if nodes.len() == 1 { " node" } else { " nodes" })
                    " share this catalog; " (live) " live. Each instance's WAL receiver, backups and retention run on the node that owns it; "
                    "a node without a heartbeat for one lease loses its instances to the live ones."
                }
            }
        }
        div.card.tablewrap {
            table.data.sortable #nodes {
                thead { tr {
                    (sort_th("Node", "text"))
                    (sort_th("API address", "text"))
                    (sort_th("Version", "version"))
                    (sort_th("Started", "num"))
                    (sort_th("Last heartbeat", "num"))
                    (sort_th("Health", "text"))
                    (sort_th("Instances", "num"))
                } }
                tbody {
                    @for n in nodes {
                        @let left = n.node.heartbeat_at == DateTime::UNIX_EPOCH;
                        tr data-node=(n.node.id) {
                            td {
                                (n.node.id)
                                @if n.this_node { " " span.muted title="The node serving this page" { "(this node)" } }
                            }
                            td { (n.node.api_address) }
                            td { (n.node.version) }
                            td data-v=(sort_time(Some(n.node.started_at))) { (time(n.node.started_at)) }
                            @if left {
                                td data-v="0" { span.muted { "—" } }
                            } @else {
                                td data-v=(sort_time(Some(n.node.heartbeat_at))) { (time(n.node.heartbeat_at)) }
                            }
                            td { (health(n.state)) }
                            td data-v=(n.owned) { (n.owned) }
                        }
                    }
                }
            }
        }
    }
}
