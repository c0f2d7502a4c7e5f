// Command quickstart calls agentstore from Go with the generated stubs (docs/clients/go.md).
//
//	AGENTSTORE_API_KEY=$(cat .agentstore/demo-api-key) go run ./docs/clients/go/quickstart
//
// It creates agents, gets one, lists them with a filter in pages, updates one with its etag and a
// field mask, claims and completes a task, decodes a typed error, checks health, and prints what it
// saw as one JSON object. It reads AGENTSTORE_ADDRESS (127.0.0.1:50051) and AGENTSTORE_API_KEY.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/structpb"

	agentstorev1 "github.com/agentstore/agentstore/gen/go/agentstore/v1"
)

// serviceConfig is the published service config (clients/python/src/agentstore/client/service_config.json):
// UNAVAILABLE is retried with exponential backoff. grpc-go before 1.40 also needs GRPC_GO_RETRY=on.
const serviceConfig = `{
  "methodConfig": [{
    "name": [
      {"service": "agentstore.v1.AchievementService"}, {"service": "agentstore.v1.AgentService"},
      {"service": "agentstore.v1.AuditLogService"}, {"service": "agentstore.v1.SessionService"},
      {"service": "agentstore.v1.TaskService"}, {"service": "agentstore.v1.TenantService"},
      {"service": "grpc.health.v1.Health"}
    ],
    "retryPolicy": {
      "maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "5s", "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }],
  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
}`

func randomBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		log.Fatal(err)
	}
	return b
}

// newUUID returns a random (version 4) UUID, the form request_id and x-request-id take.
func newUUID() string {
	b := randomBytes(16)
	b[6], b[8] = (b[6]&0x0f)|0x40, (b[8]&0x3f)|0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// withKey adds the API key and an x-request-id to every unary call.
func withKey(apiKey string) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+apiKey, "x-request-id", newUUID())
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

// errorDetails is what a failed call said: the code, ErrorInfo's reason and BadRequest's fields.
type errorDetails struct {
	Code   string   `json:"code"`
	Reason string   `json:"reason"`
	Fields []string `json:"fields,omitempty"`
}

func decode(err error) errorDetails {
	st := status.Convert(err)
	decoded := errorDetails{Code: st.Code().String()}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			decoded.Reason = d.GetReason()
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				decoded.Fields = append(decoded.Fields, v.GetField())
			}
		case *errdetails.RetryInfo:
			// d.GetRetryDelay().AsDuration() says when to try again.
		}
	}
	return decoded
}

func mustStruct(fields map[string]interface{}) *structpb.Struct {
	s, err := structpb.NewStruct(fields)
	if err != nil {
		log.Fatal(err)
	}
	return s
}

func main() {
	address := os.Getenv("AGENTSTORE_ADDRESS")
	if address == "" {
		address = "127.0.0.1:50051"
	}
	conn, err := grpc.Dial(address, grpc.WithInsecure(), grpc.WithDefaultServiceConfig(serviceConfig),
		grpc.WithUnaryInterceptor(withKey(os.Getenv("AGENTSTORE_API_KEY"))))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	agents := agentstorev1.NewAgentServiceClient(conn)
	tasks := agentstorev1.NewTaskServiceClient(conn)
	run := hex.EncodeToString(randomBytes(4))
	skill := "go-" + run
	seen := map[string]interface{}{}

	// Create (request_id makes a retried create return the first result).
	created, err := agents.CreateAgent(ctx, &agentstorev1.CreateAgentRequest{
		Agent: &agentstorev1.Agent{Name: "planner-" + run, Role: "planner", Capabilities: []string{skill},
			Metadata: mustStruct(map[string]interface{}{"region": "eu"})},
		RequestId: newUUID(),
	})
	if err != nil {
		log.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if _, err := agents.CreateAgent(ctx, &agentstorev1.CreateAgentRequest{Agent: &agentstorev1.Agent{
			Name: fmt.Sprintf("worker-%s-%d", run, i), Capabilities: []string{skill},
			Metadata: mustStruct(map[string]interface{}{"region": "eu"})}}); err != nil {
			log.Fatal(err)
		}
	}
	seen["created"] = created.GetName()

	// Get
	got, err := agents.GetAgent(ctx, &agentstorev1.GetAgentRequest{Id: created.GetId()})
	if err != nil {
		log.Fatal(err)
	}
	seen["got_same_etag"] = got.GetEtag() == created.GetEtag()

	// List with a filter, two per page, following next_page_token.
	listed, pages, token := []string{}, 0, ""
	for {
		page, err := agents.ListAgents(ctx, &agentstorev1.ListAgentsRequest{
			Filter: fmt.Sprintf(`capabilities:"%s" AND metadata.region = "eu"`, skill), OrderBy: "name", PageSize: 2, PageToken: token,
		})
		if err != nil {
			log.Fatal(err)
		}
		pages++
		for _, a := range page.GetAgents() {
			listed = append(listed, a.GetName())
		}
		if token = page.GetNextPageToken(); token == "" {
			break
		}
	}
	seen["listed"], seen["pages"] = listed, pages

	// Update one field by mask, guarded by the etag; the same stale etag again is a typed error.
	patch := &agentstorev1.UpdateAgentRequest{
		Agent:      &agentstorev1.Agent{Id: got.GetId(), Role: "lead", Etag: got.GetEtag()},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"role"}},
	}
	updated, err := agents.UpdateAgent(ctx, patch)
	if err != nil {
		log.Fatal(err)
	}
	seen["updated_role"] = updated.GetRole()
	if _, err := agents.UpdateAgent(ctx, patch); err != nil {
		stale := decode(err)
		seen["stale_update"] = map[string]string{"code": stale.Code, "reason": stale.Reason}
	}

	// Claim a task (a 60 s lease) and complete it with its lease token.
	if _, err := tasks.CreateTask(ctx, &agentstorev1.CreateTaskRequest{Task: &agentstorev1.Task{
		Title: "index the docs", Priority: 5, RequiredCapabilities: []string{skill}}}); err != nil {
		log.Fatal(err)
	}
	claimed, err := tasks.ClaimTask(ctx, &agentstorev1.ClaimTaskRequest{AgentId: created.GetId(), LeaseDuration: durationpb.New(60 * time.Second)})
	if err != nil {
		log.Fatal(err)
	}
	seen["claimed_lease_token"] = strconv.FormatInt(claimed.GetLeaseToken(), 10)
	done, err := tasks.CompleteTask(ctx, &agentstorev1.CompleteTaskRequest{
		TaskId: claimed.GetTask().GetId(), LeaseToken: claimed.GetLeaseToken(), Result: mustStruct(map[string]interface{}{"pages": 12}),
	})
	if err != nil {
		log.Fatal(err)
	}
	seen["completed_status"] = done.GetStatus().String()

	// A typed error: ErrorInfo.reason to switch on, BadRequest naming the field.
	if _, err := agents.GetAgent(ctx, &agentstorev1.GetAgentRequest{Id: "not-a-uuid"}); err != nil {
		seen["error"] = decode(err)
	}

	// Health (no key needed; "" is the whole server).
	health, err := grpc_health_v1.NewHealthClient(conn).Check(ctx, &grpc_health_v1.HealthCheckRequest{Service: ""})
	if err != nil {
		log.Fatal(err)
	}
	seen["health"] = health.GetStatus().String()

	out, err := json.Marshal(seen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(out))
}
