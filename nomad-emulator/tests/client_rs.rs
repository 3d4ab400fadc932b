//! The emulator driven through a Nomad client library nobody here wrote: nomad-client-rs.

mod common;

use common::*;
use nomad_client_rs::allocation::{ListAllocationsOptions, ReadAllocationOptions};
use nomad_client_rs::event::{EventTopic, SubscribeToEventsOptions};
use nomad_client_rs::job::{
    CreateJobRequest, Job, ListJobAllocationsOptions, ListJobsOptions, ReadJobOptions,
    StopJobOptions,
};
use nomad_client_rs::{Config, Connection, NomadClient};

fn client(emu: &nomad_emulator::NomadEmulator) -> NomadClient {
    let _ = rustls::crypto::ring::default_provider().install_default();
    NomadClient::new(Config {
        connection: Connection::HttpApi {
            address: emu.base_url(),
            credential: None,
        },
        ..Config::default()
    })
    .unwrap()
}

fn ns() -> Option<String> {
    Some("default".into())
}

#[tokio::test]
async fn nomad_client_rs_round_trip() {
    let emu = start_emulator(FakeRuntime::new()).await;
    let c = emu.control();
    let nomad = client(&emu);
    let mut opts = SubscribeToEventsOptions {
        namespace: ns(),
        ..Default::default()
    };
    opts.add_topic(EventTopic::Allocation);
    opts.add_topic(EventTopic::Job);
    let (stream_task, mut events) = nomad.subscribe_to_events(&opts);

    for id in ["20-a", "20-b", "other"] {
        let job: Job = serde_json::from_value(runner_job(id)).unwrap();
        let r = nomad
            .create_job(&CreateJobRequest {
                job: Some(job),
                namespace: ns(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(r.eval_id.is_some_and(|e| !e.is_empty()));
    }
    wait_alloc_status(&c, "20-a", "running").await;
    let job = nomad
        .read_job("20-a", &ReadJobOptions { namespace: ns() })
        .await
        .unwrap();
    assert_eq!(job.id.as_deref(), Some("20-a"));
    assert_eq!(job.status.as_deref(), Some("running"));
    assert_eq!(job.task_groups.as_ref().unwrap().len(), 2);
    let list = nomad
        .list_jobs(&ListJobsOptions {
            prefix: Some("20-".into()),
            namespace: ns(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<_> = list.iter().map(|j| j.id.clone().unwrap()).collect();
    assert_eq!(ids, ["20-a", "20-b"]);
    let allocs = nomad
        .list_job_allocations(
            "20-a",
            &ListJobAllocationsOptions {
                all: Some(false),
                namespace: ns(),
            },
        )
        .await
        .unwrap();
    assert_eq!(allocs.len(), 1);
    let alloc_id = allocs[0].id.clone().unwrap();
    let alloc = nomad
        .read_allocation(&alloc_id, &ReadAllocationOptions { namespace: ns() })
        .await
        .unwrap();
    assert_eq!(alloc.client_status.as_deref(), Some("running"));
    assert_eq!(alloc.previous_allocation.as_deref(), Some(""));
    let ports = alloc
        .allocated_resources
        .unwrap()
        .shared
        .unwrap()
        .ports
        .unwrap();
    assert_eq!(ports[0].to, Some(8080));
    let all = nomad
        .list_allocations(&ListAllocationsOptions {
            namespace: ns(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(all.len() >= 2);
    let node = nomad
        .read_node(alloc.node_id.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(node.status.as_deref(), Some("ready"));
    nomad
        .stop_job(
            "20-a",
            &StopJobOptions {
                purge: Some(true),
                namespace: ns(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        nomad
            .read_job("20-a", &ReadJobOptions { namespace: ns() })
            .await
            .is_err()
    );
    wait_alloc_status(&c, "20-a", "complete").await;

    // The subscription saw the allocation run and the purge.
    let mut saw_running = false;
    let mut saw_deregister = false;
    while !(saw_running && saw_deregister) {
        let ev = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("events stalled")
            .expect("stream ended");
        if ev.find_allocation_id() == Some(alloc_id.as_str())
            && ev
                .payload
                .as_ref()
                .and_then(|p| p.allocation.as_ref())
                .and_then(|a| a.client_status.as_deref())
                == Some("running")
        {
            saw_running = true;
        }
        if ev.topic == Some(EventTopic::Job)
            && ev.key == "20-a"
            && format!("{:?}", ev.r#type).contains("JobDeregistered")
        {
            saw_deregister = true;
        }
    }
    stream_task.abort();
    emu.shutdown().await;
}
