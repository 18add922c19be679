// facegate example client in Go: CheckLiveness on image files, IdentifyFromClip on a folder of frames.
//
//	facegate-client [-target HOST:PORT] [-deadline 10s] [-tls-ca FILE] liveness IMAGE...
//	facegate-client [-target HOST:PORT] [-deadline 10s] [-tls-ca FILE] -fps F identify COLLECTION DIR
//
// Caller identity: -token-file FILE sends "authorization: Bearer <token>" on every call; -tls-cert FILE and
// -tls-key FILE (with -tls-ca) present a client certificate for mutual TLS.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	pb "facegate/gen/facegate/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
)

var digits = regexp.MustCompile(`\d+`)

// framesOf lists frame images ordered by the last number in their file names.
func framesOf(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	type frame struct {
		n    int64
		path string
	}
	var frames []frame
	for _, e := range entries {
		ext := strings.ToLower(filepath.Ext(e.Name()))
		if ext != ".jpg" && ext != ".jpeg" && ext != ".png" && ext != ".webp" && ext != ".bmp" {
			continue
		}
		n := int64(-1)
		if m := digits.FindAllString(strings.TrimSuffix(e.Name(), ext), -1); len(m) > 0 {
			n, _ = strconv.ParseInt(m[len(m)-1], 10, 64)
		}
		frames = append(frames, frame{n, filepath.Join(dir, e.Name())})
	}
	sort.Slice(frames, func(i, j int) bool {
		if frames[i].n != frames[j].n {
			return frames[i].n < frames[j].n
		}
		return frames[i].path < frames[j].path
	})
	out := make([]string, len(frames))
	for i, f := range frames {
		out[i] = f.path
	}
	return out, nil
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "server address")
	deadline := flag.Duration("deadline", 10*time.Second, "deadline per call")
	caFile := flag.String("tls-ca", "", "PEM file of the CA that signed the server certificate (enables TLS)")
	certFile := flag.String("tls-cert", "", "client certificate (PEM) for mutual TLS, with -tls-key")
	keyFile := flag.String("tls-key", "", "client private key (PEM) for mutual TLS")
	tokenFile := flag.String("token-file", "", "file holding a bearer token, sent on every call")
	fps := flag.Float64("fps", 0, "capture frame rate of the clip (identify)")
	flag.Parse()
	args := flag.Args()
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: facegate-client [flags] liveness IMAGE... | -fps F identify COLLECTION DIR")
		os.Exit(2)
	}
	creds := grpc.WithInsecure()
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		pool := x509.NewCertPool()
		if err != nil || !pool.AppendCertsFromPEM(pem) {
			fmt.Fprintln(os.Stderr, "cannot read the CA file", *caFile, err)
			os.Exit(2)
		}
		cfg := &tls.Config{RootCAs: pool}
		if *certFile != "" { // mutual TLS: the client certificate identifies the caller
			pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
			cfg.Certificates = []tls.Certificate{pair}
		}
		creds = grpc.WithTransportCredentials(credentials.NewTLS(cfg))
	}
	token := ""
	if *tokenFile != "" {
		data, err := os.ReadFile(*tokenFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		token = strings.TrimSpace(string(data))
	}
	// Every call: its deadline, and the bearer token when one is given.
	callContext := func() (context.Context, context.CancelFunc) {
		ctx, cancel := context.WithTimeout(context.Background(), *deadline)
		if token != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
		}
		return ctx, cancel
	}
	conn, err := grpc.Dial(*target, creds, grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer conn.Close()
	failures := 0
	switch args[0] {
	case "liveness":
		client := pb.NewLivenessServiceClient(conn)
		for _, path := range args[1:] {
			data, err := os.ReadFile(path)
			if err != nil {
				fmt.Printf("%s\tERROR\t%v\n", path, err)
				failures++
				continue
			}
			ctx, cancel := callContext()
			resp, err := client.CheckLiveness(ctx, &pb.CheckLivenessRequest{Image: &pb.Image{Data: data}})
			cancel()
			if err != nil {
				fmt.Printf("%s\tERROR\t%v\n", path, err)
				failures++
				continue
			}
			decision := strings.TrimPrefix(resp.Decision.String(), "DECISION_")
			fmt.Printf("%s\t%s\tlive_score=%.9f\n", path, decision, resp.LiveScore)
		}
	case "identify":
		if len(args) != 3 {
			fmt.Fprintln(os.Stderr, "identify COLLECTION DIR")
			os.Exit(2)
		}
		paths, err := framesOf(args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		clip := &pb.Clip{Fps: *fps}
		for _, p := range paths {
			data, err := os.ReadFile(p)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			clip.Frames = append(clip.Frames, &pb.Image{Data: data})
		}
		ctx, cancel := callContext()
		defer cancel()
		resp, err := pb.NewIdentificationServiceClient(conn).IdentifyFromClip(ctx,
			&pb.IdentifyFromClipRequest{Collection: args[1], Clip: clip, TopK: 3})
		if err != nil {
			fmt.Printf("%s\tERROR\t%v\n", args[2], err)
			os.Exit(1)
		}
		top, score := "-", float32(0)
		if len(resp.Candidates) > 0 {
			top, score = resp.Candidates[0].PersonId, resp.Candidates[0].Score
		}
		decision := strings.TrimPrefix(resp.Decision.String(), "MATCH_DECISION_")
		fmt.Printf("%s\t%s\tcandidate=%s\tscore=%.9f\n", args[2], decision, top, score)
	default:
		fmt.Fprintln(os.Stderr, "unknown command", args[0])
		os.Exit(2)
	}
	if failures > 0 {
		os.Exit(1)
	}
}
